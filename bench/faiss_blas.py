"""Benchmark: faiss's exact flat search with the OpenBLAS kernels faiss picks itself, and with the ones reprolib names.

    .venv/bin/python bench/faiss_blas.py                 # -> bench/results/faiss_blas.json (about a minute)

faiss-cpu bundles its own OpenBLAS, which chooses its kernels from the CPU model when it loads. Version 0.3.15 (in
faiss-cpu 1.15) does not know the newest Xeons and runs SSE3 kernels there. reprolib.index.require_faiss names
the kernels first (reprolib.cpu.openblas_kernels_named, from the CPU's flags). Each arm is a fresh process that
imports faiss one way or the other, then times IndexFlatIP.search, the call reprolib's flat search makes per
shard: one shard of reprolib's default 100,000 rows, 768 dimensions (BERT-base), 1,000 queries, at 1 and 2
threads, the arms alternated, `--repeats` times (median queries/s).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

from benchutil import RESULTS, header, load_average, write_json

ARMS = {
    "faiss's own choice": "import faiss",
    "reprolib": "from reprolib.index import require_faiss; faiss = require_faiss()",
}

TIMED = """
{load}
import json, time, numpy as np, threadpoolctl
rng = np.random.default_rng(0)
shard = rng.standard_normal(({rows}, {dim}), dtype=np.float32)
queries = rng.standard_normal(({queries}, {dim}), dtype=np.float32)
index = faiss.IndexFlatIP({dim})
index.add(shard)
result = {{"openblas": sorted({{p["architecture"] for p in threadpoolctl.threadpool_info()
                               if p["internal_api"] == "openblas" and "faiss" in p["filepath"]}})}}
for threads in (1, 2):
    faiss.omp_set_num_threads(threads)
    with threadpoolctl.threadpool_limits(threads):
        index.search(queries[:100], {k})                      # warm-up
        start = time.perf_counter()
        index.search(queries, {k})
        result[threads] = {queries} / (time.perf_counter() - start)
print(json.dumps(result))
"""


def run_arm(load, args):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    code = TIMED.format(load=load, rows=args.rows, dim=args.dim, queries=args.queries, k=args.k)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "faiss_blas.json"))
    args = parser.parse_args()

    result = header("faiss_blas")
    result["settings"] = {"rows": args.rows, "dim": args.dim, "queries": args.queries, "k": args.k,
                          "repeats": args.repeats}
    runs = {arm: [] for arm in ARMS}
    for _ in range(args.repeats):
        for arm, load in ARMS.items():
            runs[arm].append(run_arm(load, args))
    result["arms"] = {arm: {"openblas": got[0]["openblas"],
                            **{f"queries_per_s_{t}_threads": round(statistics.median(r[str(t)] for r in got), 1)
                               for t in (1, 2)}}
                      for arm, got in runs.items()}
    result["load_average_at_end"] = load_average()
    write_json(args.out, result)
    print(json.dumps(result["arms"], indent=1))


if __name__ == "__main__":
    main()
