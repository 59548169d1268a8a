"""Before renting: each GPU recipe stage's compute, from FLOPs counted on this CPU, turned into H100 hours.

    .venv/bin/python bench/gpu_hours.py          # ~2 min -> bench/results/gpu_hours.json, a table on stdout

For every stage of the MS MARCO recipe YAMLs (params/*_msmarco.yaml) that trains, encodes, mines or scores, the
work is read from the stage's own parameters (model, lengths, group size, epochs) and MS MARCO's sizes. The FLOPs
of one sequence of each kind (forward, or forward + backward for training) are counted with
torch.utils.flop_counter on randomly initialised models of the recipe's architecture (BERT-base, DeBERTa-v3-base,
T5-base; RetroMAE's and LexMAE's pretraining models with their decoders), then multiplied out. Hours assume an
H100 SXM (989 TFLOP/s dense bf16) at MFU 40% for training and 50% for inference, and 8 GPUs at 90% scaling:
FLOP counts are measured, the utilisation is an assumption (say so when quoting). Exact search is counted as
its matrix product (queries x passages x 2 x dim).
"""
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchutil import REPO, RESULTS, header, write_json

PASSAGES, TRAIN_QUERIES, TRAIN_QRELS_ROWS, DEV_QUERIES = 8_841_823, 502_939, 532_761, 6_980
H100_FLOPS, TRAIN_MFU, INFER_MFU, EIGHT_GPU_SCALING = 989e12, 0.40, 0.50, 0.90
torch.manual_seed(0)


# ---- FLOPs per sequence, counted --------------------------------------------------------------------------------

def counted(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bert(kind="bert"):
    from transformers import BertConfig, BertModel, DebertaV2Config, DebertaV2Model, T5Config, T5Model

    if kind == "deberta":   # microsoft/deberta-v3-base
        return DebertaV2Model(DebertaV2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                              intermediate_size=3072, vocab_size=128_100, relative_attention=True,
                                              position_buckets=256, pos_att_type=["p2c", "c2p"],
                                              max_relative_positions=-1, norm_rel_ebd="layer_norm",
                                              share_att_key=True, max_position_embeddings=512))
    if kind == "t5":        # t5-base
        return T5Model(T5Config(d_model=768, num_layers=12, num_heads=12, d_ff=3072, vocab_size=32_128))
    return BertModel(BertConfig())   # bert-base-uncased's shape


def encoder_flops(kind, length, train):
    """FLOPs of one sequence of `length` tokens (T5: the encoder plus one decoder step, OpenMatch's pooling)."""
    model = MODELS[kind]
    ids = torch.randint(1000, 2000, (1, length))

    def step():
        if kind == "t5":
            out = model(input_ids=ids, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long)).last_hidden_state
        else:
            out = model(input_ids=ids).last_hidden_state
        if train:
            out.sum().backward()
    with torch.set_grad_enabled(train):
        return counted(step)


def pretraining_flops(method, length):
    """FLOPs of one pretraining sequence, forward + backward, RetroMAE's or LexMAE's model (BERT-base)."""
    from transformers import BertConfig, BertForMaskedLM

    from reprolib.data.masking import IGNORE

    lm = BertForMaskedLM(BertConfig())
    ids = torch.randint(1000, 2000, (1, length))
    encoder_labels = torch.full((1, length), IGNORE)
    encoder_labels[:, 1:int(0.3 * length)] = ids[:, 1:int(0.3 * length)]
    if method == "retromae":
        from reprolib.modeling.retromae import RetroMAEForPretraining

        model = RetroMAEForPretraining(lm)
        batch = dict(encoder_input_ids=ids, encoder_labels=encoder_labels, decoder_input_ids=ids,
                     decoder_visibility=torch.ones(1, length, length, dtype=torch.long), decoder_labels=ids,
                     attention_mask=torch.ones(1, length, dtype=torch.long))
    else:
        from reprolib.modeling.lexmae import LexMAEForPretraining

        model = LexMAEForPretraining(lm)
        decoder_labels = torch.full((1, length), IGNORE)
        decoder_labels[:, 1:length // 2] = ids[:, 1:length // 2]
        batch = dict(encoder_input_ids=ids, encoder_labels=encoder_labels, decoder_input_ids=ids,
                     decoder_labels=decoder_labels, attention_mask=torch.ones(1, length, dtype=torch.long),
                     text_mask=torch.ones(1, length, dtype=torch.long))
    return counted(lambda: model(**batch)[0].backward())


MODELS = {}


def architecture(model):
    name = str(model).lower()
    return "deberta" if "deberta" in name else "t5" if "t5" in name else "bert"


# ---- the recipes' stages -----------------------------------------------------------------------------------------

def stage_work(stage, params, kind):
    """[(what, kind, length, sequences, train)] of one stage, or [] for stages without GPU work."""
    notebook = stage.notebook.stem
    q_len, p_len = params.get("query_max_len") or 32, params.get("passage_max_len") or 128
    epochs, group = params.get("epochs") or 1, params.get("group_size") or 8
    if notebook.startswith(("10_", "11_")):
        return [("pretrain", "retromae" if notebook.startswith("10_") else "lexmae", p_len, PASSAGES * epochs, True)]
    if notebook.startswith(("20_", "21_", "70_")):
        per_query = params.get("per_query", params.get("sampler") == "tevatron")
        examples = (TRAIN_QUERIES if per_query else TRAIN_QRELS_ROWS) * epochs
        return [("queries", kind, q_len, examples, True), ("passages", kind, p_len, examples * group, True)]
    if notebook.startswith("30_"):
        return [("passages", kind, p_len, PASSAGES, False)]
    if notebook.startswith("50_"):
        return [("train queries", kind, q_len, TRAIN_QUERIES, False)]
    if notebook.startswith("60_"):
        pairs = TRAIN_QRELS_ROWS * epochs * group
        scored = TRAIN_QUERIES * ((params.get("score_depth") or 0) + 1) if params.get("score_candidates") else 0
        return [("pairs", "deberta" if kind == "deberta" else "bert", p_len, pairs, True),
                ("teacher pairs", "deberta" if kind == "deberta" else "bert", p_len, scored, False)]
    return []


def main():
    from reprolib.pipeline import load_pipeline

    for kind in ("bert", "deberta", "t5"):
        MODELS[kind] = bert(kind)
    cache, rows = {}, []
    for path in sorted((REPO / "params").glob("*_msmarco.yaml")):
        pipeline = load_pipeline(path)
        kinds = {}
        for stage in pipeline.stages:
            model = str(stage.params.get("model", "bert"))
            upstream = model.split(".")[1] if model.startswith("${stages.") else None
            kinds[stage.id] = kinds.get(upstream, "bert") if upstream else architecture(model)
            work = stage_work(stage, stage.params, kinds[stage.id])
            if not work:
                continue
            total = 0.0
            parts = []
            for what, kind, length, sequences, train in work:
                key = (kind, length, train)
                if key not in cache:
                    cache[key] = (pretraining_flops(kind, length) if kind in ("retromae", "lexmae")
                                  else encoder_flops(kind, length, train))
                flops = cache[key] * sequences
                hours = flops / (H100_FLOPS * (TRAIN_MFU if train else INFER_MFU)) / 3600
                total += hours
                parts.append({"what": what, "model": kind, "length": length, "sequences": sequences,
                              "train": train, "flops_per_sequence": cache[key], "flops": flops, "h100_hours": hours})
            if stage.notebook.stem.startswith(("30_", "50_")) and "search" not in [p["what"] for p in parts]:
                queries = TRAIN_QUERIES if stage.notebook.stem.startswith("50_") else 0
                if queries:   # mining: an exact search of every train query over the corpus
                    flops = 2 * 768 * queries * PASSAGES
                    hours = flops / (H100_FLOPS * INFER_MFU) / 3600
                    total += hours
                    parts.append({"what": "exact search", "flops": flops, "h100_hours": hours})
            rows.append({"recipe": path.stem, "stage": stage.id, "notebook": stage.notebook.name, "parts": parts,
                         "h100_hours": round(total, 2), "8xh100_hours": round(total / 8 / EIGHT_GPU_SCALING, 2)})
    result = {**header("gpu_hours"), "assumptions": {
        "h100_dense_bf16_flops": H100_FLOPS, "train_mfu": TRAIN_MFU, "inference_mfu": INFER_MFU,
        "eight_gpu_scaling": EIGHT_GPU_SCALING, "msmarco": {"passages": PASSAGES, "train_queries": TRAIN_QUERIES,
                                                            "train_qrels_rows": TRAIN_QRELS_ROWS}},
        "flops_per_sequence": {f"{k[0]}@{k[1]}{' train' if k[2] else ''}": v for k, v in cache.items()},
        "stages": rows}
    write_json(RESULTS / "gpu_hours.json", result)
    print(f"{'recipe':<32} {'stage':<18} {'H100 h':>9} {'8xH100 h':>9}")
    for row in rows:
        print(f"{row['recipe']:<32} {row['stage']:<18} {row['h100_hours']:>9.2f} {row['8xh100_hours']:>9.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
