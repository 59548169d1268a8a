"""Benchmark: sparse (LexMAE / SPLADE) retrieval on SciFact, float and quantized, against BM25 (bm25s).

    .venv/bin/python bench/sparse_search.py --model PATH      # -> bench/results/sparse_search.json
    .venv/bin/python bench/sparse_search.py --model PATH --limit 300 --repeats 1 --out /tmp/quick.json

PATH is a folder saved by SparseEncoder (e.g. a LexMAE fine-tuning stage's model/). In one process: the
corpus is encoded into a sparse index (reprolib.index.encode_corpus, timed on its own), the test queries
are encoded (timed), then each system retrieves the top `--topk` for every query, in alternating order,
`--repeats` times (median):

    sparse float      reprolib.index.search_sparse: exact float32 dot products
    sparse quantized  the same with Anserini's integer impacts round(100 w)
    bm25              reprolib.search.bm25_retrieve over a bm25_index built beforehand (bm25s)

queries/s are reported for retrieval alone (encoded queries or query texts in, the run {qid: {pid: score}} out)
and, for the sparse systems, with query encoding included;
nDCG@10 of each run through reprolib.metrics.evaluate. `--limit N` keeps a seeded sample of N passages
(a smoke test: nDCG then counts relevant passages that are not in the sample as missed).
Prints `skipped: ...` and exits 0 when SciFact or the model is absent.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchutil import RESULTS, SCIFACT, header, load_average, scifact_passages, write_json


def require_inputs(model):
    missing = None
    if not (SCIFACT / "corpus.jsonl").is_file():
        missing = f"SciFact is not at {SCIFACT}"
    elif model is None:
        missing = "no --model given (a folder saved by SparseEncoder)"
    elif not Path(model).is_dir():
        missing = f"the model folder {model} does not exist"
    if missing:
        print(f"skipped: {missing}")
        sys.exit(0)


def corpus_file(workdir, limit):
    """SciFact's corpus.jsonl, or a seeded sample of `limit` passages of it written into `workdir`."""
    if limit is None:
        return SCIFACT / "corpus.jsonl"
    path = workdir / "corpus.jsonl"
    keep = set(scifact_passages(limit)[0])
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as source, open(path, "w", encoding="utf-8") as out:
        out.writelines(line for line in source if str(json.loads(line)["_id"]) in keep)
    return path


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a folder saved by SparseEncoder")
    parser.add_argument("--limit", type=int, help="a seeded sample of this many passages (smoke test)")
    parser.add_argument("--index", type=Path, help="reuse this sparse index of the whole SciFact corpus, built "
                                                   "with --model (e.g. by a pipeline's index stage)")
    parser.add_argument("--topk", type=int, default=1000)
    parser.add_argument("--template", default="lexmae", help="passage template (default: LexMAE's (title, text) pair)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (scipy and bm25s run on one)")
    parser.add_argument("--out", type=Path, default=RESULTS / "sparse_search.json")
    args = parser.parse_args(argv)
    require_inputs(args.model)
    workdir = Path(tempfile.mkdtemp(prefix="sparse_search."))
    os.environ["REPROLIB_CACHE"] = str(workdir / "cache")  # the corpus store goes into the workdir, removed at the end
    try:
        result = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_json(args.out, result)
    print(json.dumps(result["summary"], indent=2))


def run(args, workdir):
    import torch

    from reprolib.data import Corpus, read_qrels
    from reprolib.data.layout import find_qrels_file, load_queries
    from reprolib.index import encode_corpus, load_meta, run_from_hits, search_sparse, sparsity
    from reprolib.metrics import evaluate
    from reprolib.modeling import load_encoder
    from reprolib.search import bm25_index, bm25_retrieve

    torch.set_num_threads(args.threads)
    result = header("sparse_search")
    encoder = load_encoder(args.model)
    if encoder.kind != "sparse":
        sys.exit(f"{args.model} is a {encoder.kind} encoder; this benchmark needs a sparse one")
    corpus = Corpus.open(corpus_file(workdir, args.limit), progress=False)
    queries = load_queries(SCIFACT, "test")
    qrels = read_qrels(find_qrels_file(SCIFACT, "test"))
    qids, texts = list(queries), list(queries.values())
    if args.index:
        if args.limit:
            sys.exit("--index holds the whole corpus; drop --limit")
        index, encode_seconds = args.index, None
        if load_meta(index)["num_passages"] != len(corpus):
            sys.exit(f"{index} does not hold the {len(corpus)} SciFact passages")
    else:
        index = workdir / "index"
        _, encode_seconds = timed(lambda: encode_corpus(encoder, corpus, index, batch_size=args.batch_size,
                                                        template=args.template, progress=False))
        print(f"{encode_seconds:7.1f}s  encoded {len(corpus)} passages", file=sys.stderr, flush=True)
    meta = load_meta(index)
    bm25, bm25_index_seconds = timed(lambda: bm25_index(corpus, progress=False))

    seconds = {"encode_queries": [], "float": [], "quantized": [], "bm25": []}
    for repeat in range(args.repeats):
        weights, took = timed(lambda: encoder.encode_queries(texts, batch_size=args.batch_size))
        seconds["encode_queries"].append(took)
        runs = {}
        order = ("float", "quantized", "bm25")
        for system in order[::-1] if repeat % 2 else order:  # alternating order: no system always runs first
            if system == "bm25":
                runs[system], took = timed(lambda: bm25_retrieve(bm25, corpus, queries, topk=args.topk, progress=False))
            else:
                runs[system], took = timed(lambda: run_from_hits(
                    qids, *search_sparse(weights, index, topk=args.topk, quantize=system == "quantized"), corpus))
            seconds[system].append(took)
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in seconds.items()),
              file=sys.stderr, flush=True)

    median = {name: statistics.median(values) for name, values in seconds.items()}
    summary = {}
    for system, run_ in runs.items():
        row = {"ndcg@10": round(evaluate(run_, qrels, metrics="nDCG@10").aggregate["nDCG@10"], 5),
               "queries_per_s_retrieval": round(len(qids) / median[system], 1)}
        if system != "bm25":
            row["queries_per_s_with_query_encoding"] = round(len(qids) / (median[system] + median["encode_queries"]), 1)
        summary["bm25" if system == "bm25" else f"sparse_{system}"] = row
    stats = sparsity(index, weights)
    result.update({
        "model": str(Path(args.model).resolve()),
        "data": f"BEIR SciFact: {meta['num_passages']} passages{' (a sample)' if args.limit else ''}, "
                f"{len(qids)} test queries",
        "settings": {"topk": args.topk, "template": args.template, "batch_size": args.batch_size,
                     "torch_threads": args.threads, "repeats": args.repeats, "limit": args.limit,
                     "query_max_len": encoder.query_max_len, "passage_max_len": encoder.passage_max_len},
        "summary": dict(sorted(summary.items())),
        "nonzeros": {side: {k: v for k, v in s.items() if k != "nonzeros"} for side, s in stats.items()},
        "seconds_median": {name: round(value, 3) for name, value in median.items()},
        "seconds": {name: [round(v, 3) for v in values] for name, values in seconds.items()},
        "setup_seconds": {"encode_corpus": encode_seconds and round(encode_seconds, 1), "bm25_index": round(bm25_index_seconds, 1)},
        "load_average_at_end": load_average(),
        "notes": ["Retrieval seconds run from encoded queries (sparse) or query texts (bm25: bm25s's tokenizer "
                  "included) to the run {qid: {pid: score}}; corpus encoding and BM25 indexing are setup_seconds.",
                  "The sparse index is searched exactly, shard by shard, with scipy on one core."],
    })
    return result


if __name__ == "__main__":
    main()
