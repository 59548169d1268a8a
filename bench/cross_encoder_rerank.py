"""Benchmark: rerank a first-stage run with a cross-encoder at a given pair length; quality and pairs/s.

    .venv/bin/python bench/cross_encoder_rerank.py --model outputs/scifact_minilm/cross_encoder/train/model \
        --run outputs/scifact_minilm/bm25/run.trec --max-len 256   # -> bench/results/cross_encoder_rerank_256.json

The cross-encoder of params/scifact_minilm.yaml is trained and scored at 160 tokens per pair (reranking 300 x 100
pairs at 256 costs ~25 min on 2 cores); this measures what the longer pairs are worth, on SciFact test
(nDCG@10 of the first stage's top `--depth` against the reranked list, and a paired test).
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
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"skipped: no dataset at {args.data}")
        return

    from reprolib.data import Corpus, read_qrels, read_run
    from reprolib.data.layout import find_qrels_file, load_queries
    from reprolib.metrics import evaluate, paired_test
    from reprolib.modeling import CrossEncoder
    from reprolib.rerank import rerank

    result = header("cross_encoder_rerank")
    queries = load_queries(args.data, args.split)
    qrels = read_qrels(find_qrels_file(args.data, args.split))
    first = read_run(args.run)
    top = {qid: dict(sorted(hits.items(), key=lambda h: -h[1])[:args.depth]) for qid, hits in first.items()}
    model = CrossEncoder.from_pretrained(args.model, max_len=args.max_len)
    start = time.perf_counter()
    reranked = rerank(model, first, Corpus.open(args.data), queries, depth=args.depth, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    pairs = sum(len(hits) for hits in reranked.values())
    before = evaluate(top, qrels, metrics="nDCG@10 RR@10")
    after = evaluate(reranked, qrels, metrics="nDCG@10 RR@10")
    result.update(model=str(args.model), run=str(args.run), depth=args.depth, max_len=args.max_len, pairs=pairs,
                  seconds=round(seconds, 1), pairs_per_second=round(pairs / seconds, 1),
                  first_stage=before.aggregate, reranked=after.aggregate,
                  paired_test_nDCG10=paired_test(before.per_query["nDCG@10"], after.per_query["nDCG@10"]))
    print(f"{pairs} pairs in {seconds:.0f} s ({pairs / seconds:.1f}/s); nDCG@10 {before.aggregate['nDCG@10']:.4f} "
          f"-> {after.aggregate['nDCG@10']:.4f}", file=sys.stderr)
    write_json(args.out or RESULTS / f"cross_encoder_rerank_{args.max_len}.json", result)


if __name__ == "__main__":
    main()
