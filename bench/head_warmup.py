"""Probe: does warming up the new MLM head first keep all-MiniLM-L6-v2 a retriever through masked-word pretraining?

    .venv/bin/python bench/head_warmup.py                      # ~10 min on 2 cores; -> results/head_warmup.json

MiniLM has no MLM head, so continued pretraining (RetroMAE's, LexMAE's, or MLM-only) starts one from scratch, and
after the SciFact pretraining its passages' mean-pooled vectors have drawn together (mean cosine 0.10 -> 0.69) and
it retrieves worse (params/scifact_pretraining.yaml). One suspect is the new head: its first, large and random
gradients reach the encoder before the head has learnt anything ("fine-tuning distorts pretrained features";
the usual remedy trains the head alone first). Each arm starts from MiniLM with the pipeline's new head and
masks (MLM only, SciFact passages at 128 tokens, batch 16, AdamW, warm-up then linear decay, gradients clipped at
1) and is scored zero-shot with MiniLM's own pooling (mean, cosine; passages cut at 128 tokens, the training
length), no fine-tuning: SciFact test nDCG@10 and the mean cosine between 500 passages.
  joint        every weight trains from the first step;
  head_first   `--warmup` steps with only the head's own weights training (its transform and bias; the output
               projection is the word embeddings, tied, so it stays), then the joint arm's steps, on the same
               batches and masks.
"""
import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from benchutil import RESULTS, header, require_real_inputs, write_json


def zero_shot(lm, tokenizer, data, work):
    """(test nDCG@10, mean cosine between the first 500 passages) of `lm`'s encoder as a mean-pooled retriever."""
    from reprolib.data import Corpus, find_qrels_file, read_qrels
    from reprolib.data.layout import load_queries
    from reprolib.index import encode_corpus
    from reprolib.metrics import evaluate
    from reprolib.modeling import DenseEncoder
    from reprolib.search import dense_search

    model_dir, index_dir = work / "model", work / "index"
    for old in (model_dir, index_dir):
        shutil.rmtree(old, ignore_errors=True)
    lm.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    encoder = DenseEncoder.from_pretrained(model_dir, pooling="mean", normalize=True, query_max_len=64,
                                           passage_max_len=128).eval()
    corpus = Corpus.open(data, progress=False)
    encode_corpus(encoder, corpus, index_dir, batch_size=64, progress=False)
    run = dense_search(encoder, load_queries(data, "test"), index_dir, corpus, topk=100, progress=False)
    ndcg = evaluate(run, read_qrels(find_qrels_file(data, "test")), "nDCG@10").aggregate["nDCG@10"]
    vectors = np.load(sorted(index_dir.glob("*.npy"))[0])[:500]
    cosine = float((vectors @ vectors.T)[np.triu_indices(len(vectors), 1)].mean())
    return round(ndcg, 4), round(cosine, 4)


def train(objective, params, steps, first_batch, args):
    """`steps` steps on `params` alone (the rest frozen), batches from `first_batch` on; returns the last loss."""
    import torch

    model = objective.model
    for param in model.parameters():
        param.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.01)
    warm = math.ceil(0.1 * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min((i + 1) / warm, max(0.0, (steps - i) / max(steps - warm, 1))))
    examples, loss = objective.examples, None
    for step in range(steps):
        first = (first_batch + step) * args.batch_size
        items = [examples[(first + i) % len(examples)] for i in range(args.batch_size)]
        loss, _ = objective.loss(model, items, "cpu")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return round(loss.item(), 3)


def run_arm(name, warmup, model_dir, data, work, args):
    import torch

    from reprolib.data import Corpus
    from reprolib.objectives import build_objective
    from reprolib.training import TrainConfig

    torch.manual_seed(0)
    config = TrainConfig(model=str(model_dir), out_dir=str(work), train_data=str(data), objective="retromae",
                         decoder_loss_weight=0.0, template="retromae_pretrain", passage_max_len=128,
                         batch_size=args.batch_size, learning_rate=args.learning_rate, progress=False)
    objective = build_objective(config, Corpus.open(data, progress=False))
    model, started = objective.model.train(), time.perf_counter()
    head_names = ("lm.cls.predictions.transform.", "lm.cls.predictions.bias")
    head = [p for n, p in model.named_parameters() if n.startswith(head_names)]
    row = {"arm": name, "head_steps": warmup, "joint_steps": args.steps}
    if warmup:
        row["loss_after_head_steps"] = train(objective, head, warmup, 0, args)
    row["loss"] = train(objective, list(model.parameters()), args.steps, 0, args)   # the joint arm's batches
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
