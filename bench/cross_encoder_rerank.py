"""Benchmark: rerank a first-stage run with a cross-encoder at a given pair length and precision; quality and
pairs/s.

    .venv/bin/python bench/cross_encoder_rerank.py --model outputs/scifact_minilm/cross_encoder/train/model \
        --run outputs/scifact_minilm/bm25/run.trec --max-len 256   # -> bench/results/cross_encoder_rerank_256.json
    # the first 60 queries under bf16 autocast, then again in float32 (its time and how far its scores are)
    ... --queries 60 --bf16                                      # -> cross_encoder_rerank_256_q60_bf16.json

It measures, on SciFact test, nDCG@10 of the first stage's top `--depth` against the reranked list (and a paired
test), what longer pairs are worth, and what bf16 autocast buys on a CPU with avx512_bf16.
"""
import argparse
import sys
import time
from pathlib import Path

from benchutil import RESULTS, SCIFACT, header, write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a cross-encoder folder (notebook 60's train/model)")
    parser.add_argument("--run", required=True, type=Path, help="the first-stage TREC run to rerank")
    parser.add_argument("--data", type=Path, default=SCIFACT, help="dataset dir with the queries and qrels")
    parser.add_argument("--split", default="test")
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--queries", type=int, help="only the first N queries of the run (sorted by qid)")
    parser.add_argument("--bf16", action="store_true", help="autocast bf16; also scores in float32 to compare")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"skipped: no dataset at {args.data}")
        return

    from reprolib.data import Corpus, read_qrels, read_run
    from reprolib.data.layout import find_qrels_file, load_queries
    from reprolib.metrics import evaluate, paired_test
    from reprolib.modeling import CrossEncoder
    from reprolib.modeling.encoder import autocast
    from reprolib.rerank import rerank

    result = header("cross_encoder_rerank")
    queries = load_queries(args.data, args.split)
    qrels = read_qrels(find_qrels_file(args.data, args.split))
    first = read_run(args.run)
    if args.queries:   # the first N judged queries, and only their qrels (the others would count as zeros)
        first = {qid: first[qid] for qid in sorted(set(first) & set(qrels))[:args.queries]}
        qrels = {qid: qrels[qid] for qid in first}
    top = {qid: dict(sorted(hits.items(), key=lambda h: -h[1])[:args.depth]) for qid, hits in first.items()}
    model = CrossEncoder.from_pretrained(args.model, max_len=args.max_len)
    corpus = Corpus.open(args.data)
    start = time.perf_counter()
    with autocast("bf16" if args.bf16 else None, "cpu"):
        reranked = rerank(model, first, corpus, queries, depth=args.depth, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    if args.bf16:
        start = time.perf_counter()
        full = rerank(model, first, corpus, queries, depth=args.depth, batch_size=args.batch_size)
        result["float32_seconds"] = round(time.perf_counter() - start, 1)
        result["float32_agreement"] = _agreement(full, reranked)
        result["float32_reranked"] = evaluate(full, qrels, metrics="nDCG@10 RR@10").aggregate
    pairs = sum(len(hits) for hits in reranked.values())
    before = evaluate(top, qrels, metrics="nDCG@10 RR@10")
    after = evaluate(reranked, qrels, metrics="nDCG@10 RR@10")
    result.update(model=str(args.model), run=str(args.run), depth=args.depth, max_len=args.max_len,
                  precision="bf16" if args.bf16 else "float32", queries=len(first), pairs=pairs,
                  seconds=round(seconds, 1), pairs_per_second=round(pairs / seconds, 1),
                  first_stage=before.aggregate, reranked=after.aggregate,
                  paired_test_nDCG10=paired_test(before.per_query["nDCG@10"], after.per_query["nDCG@10"]))
    print(f"{pairs} pairs in {seconds:.0f} s ({pairs / seconds:.1f}/s); nDCG@10 {before.aggregate['nDCG@10']:.4f} "
          f"-> {after.aggregate['nDCG@10']:.4f}", file=sys.stderr)
    name = f"cross_encoder_rerank_{args.max_len}" + (f"_q{args.queries}" if args.queries else "") + \
        ("_bf16" if args.bf16 else "")
    write_json(args.out or RESULTS / f"{name}.json", result)


def _agreement(full, half):
    """How far bf16 scores are from float32 ones: the largest logit difference, and the share of queries whose
    top 10 is the same list in the same order."""
    import numpy as np

    diffs = [abs(full[qid][pid] - half[qid][pid]) for qid in full for pid in full[qid]]
    same_top = [_top(full[qid], 10) == _top(half[qid], 10) for qid in full]
    return {"max_abs_logit_diff": float(np.max(diffs)), "mean_abs_logit_diff": float(np.mean(diffs)),
            "same_top10_share": float(np.mean(same_top))}


def _top(hits, k):
    return [pid for pid, _ in sorted(hits.items(), key=lambda h: -h[1])[:k]]


if __name__ == "__main__":
    main()
