"""Probe: does warming up the new MLM head first keep all-MiniLM-L6-v2 a retriever through masked-word pretraining?

    .venv/bin/python bench/head_warmup.py                      # ~9 min on 2 cores; -> results/head_warmup.json

MiniLM has no MLM head, so continued pretraining (RetroMAE's, LexMAE's, or MLM-only) starts one from scratch, and
after the SciFact pretraining its passages' mean-pooled vectors have drawn together (mean cosine 0.10 -> 0.69) and
it retrieves worse (params/scifact_pretraining.yaml). One suspect is the new head: its first, large and random
gradients reach the encoder before the head has learnt anything ("fine-tuning distorts pretrained features";
the usual remedy trains the head alone first). Each arm starts from MiniLM with the pipeline's new head and
masks (MLM only, SciFact passages at 128 tokens, batch 16, the training loop's AdamW and schedule: 10% warm-up
from lr 0, then linear decay, gradients clipped at 1) and is scored zero-shot with MiniLM's own pooling (mean, cosine;
passages cut at 128 tokens, the training length), no fine-tuning: SciFact test nDCG@10 and the mean cosine
between 500 passages.
  joint        every weight trains from the first step;
  head_first   `--warmup` steps with the encoder frozen (`encoder_learning_rate: 0`: the head's transform and bias
               train; the output projection is the word embeddings, tied, so it stays), then the joint arm's
               steps, on the same batches, masks and dropout (batches its head has already fitted, so its
               last loss is not the joint arm's equal).
"""
import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from benchutil import RESULTS, header, pretrain_with_probes, require_real_inputs, write_json


def zero_shot(lm, tokenizer, data, work):
    """(test nDCG@10, mean cosine between the first 500 passages) of `lm`'s encoder as a mean-pooled retriever."""
    from reprolib.modeling import DenseEncoder
    from reprolib.zero_shot import Settings, retrieve_and_evaluate

    for old in ("model", "index"):
        shutil.rmtree(work / old, ignore_errors=True)
    lm.save_pretrained(str(work / "model"))
    tokenizer.save_pretrained(str(work / "model"))
    encoder = DenseEncoder.from_pretrained(work / "model", pooling="mean", normalize=True).eval()
    settings = Settings(model="probe", metrics="nDCG@10", passage_max_len=128, query_max_len=64, topk=100)
    found = retrieve_and_evaluate(encoder, data, "test", work, settings, batch_size=64, progress=False)
    vectors = np.load(sorted((work / "index").glob("*.npy"))[0])[:500]
    cosine = float((vectors @ vectors.T)[np.triu_indices(len(vectors), 1)].mean())
    return round(found["metrics"]["nDCG@10"], 4), round(cosine, 4)


def run_arm(name, head_steps, model_dir, data, work, args):
    import torch

    from reprolib.data import Corpus
    from reprolib.objectives import build_objective
    from reprolib.training import TrainConfig, _optimizer, _schedule

    torch.manual_seed(0)
    config = TrainConfig(model=str(model_dir), out_dir=str(work), train_data=str(data), objective="retromae",
                         decoder_loss_weight=0.0, template="retromae_pretrain", passage_max_len=128,
                         batch_size=args.batch_size, learning_rate=args.learning_rate, weight_decay=0.01,
                         warmup_ratio=0.1, progress=False)
    objective = build_objective(config, Corpus.open(data, progress=False))
    model, examples, started = objective.model.train(), objective.examples, time.perf_counter()
    order = list(range(len(examples)))   # corpus order: both arms' steps take the first batches, with their masks

    def train(config, steps):
        """`steps` steps of `config`'s optimizer and schedule on the first `steps` batches; the last one's loss."""
        optimizer = _optimizer(model, config)
        points = pretrain_with_probes(model, examples, order, optimizer, _schedule(optimizer, config, steps), steps,
                                      steps, dict, args.batch_size, config.max_grad_norm)
        return points[-1]["loss"]

    row = {"arm": name, "head_steps": head_steps, "joint_steps": args.steps}
    if head_steps:
        encoder = {n: p.detach().clone() for n, p in model.lm.bert.named_parameters()}
        row["loss_after_head_steps"] = train(dataclasses.replace(config, encoder_learning_rate=0.0), head_steps)
        row["head_steps_left_encoder"] = all(torch.equal(p, encoder[n]) for n, p in model.lm.bert.named_parameters())
        model.requires_grad_(True)
    torch.manual_seed(1)   # the same dropout in both arms' joint steps
    row["loss"] = train(config, args.steps)
    model.eval()
    row["nDCG@10"], row["passage_cosine"] = zero_shot(model.lm, objective.tokenizer, data, work)
    row["seconds"] = round(time.perf_counter() - started, 1)
    print(row, flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="joint steps (the passages draw together within 30)")
    parser.add_argument("--warmup", type=int, default=100, help="head-only steps of the head_first arm")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="the SciFact pretraining's")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", default=str(RESULTS / "head_warmup.json"))
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    model_dir, data = require_real_inputs()
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    result = header("head_warmup")
    result["threads"] = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = AutoModel.from_pretrained(str(model_dir)).eval()
        ndcg, cosine = zero_shot(start, AutoTokenizer.from_pretrained(str(model_dir)), data, work)
        result["minilm"] = {"nDCG@10": ndcg, "passage_cosine": cosine}
        print(result["minilm"], flush=True)
        result["arms"] = [run_arm("joint", 0, model_dir, data, work, args),
                          run_arm("head_first", args.warmup, model_dir, data, work, args)]
    write_json(args.out, result)


if __name__ == "__main__":
    main()
