"""Benchmark: the GPU figures, in one run on a lent CUDA machine (a few minutes on one H100).

    python bench/gpu_check.py                      # -> bench/results/gpu_quickstart.json, gpu_flat_search.json,
                                                   #    gpu_encode.json (and gpu_quickstart.log)
    python bench/gpu_check.py --out-dir $OUT       # on a lent machine: only what lands under $OUT comes back
    python bench/gpu_check.py --skip quickstart    # parts: quickstart, search, encode

1. quickstart: `params/quickstart.yaml` on CUDA with its three trainings in bf16 (`--set <stage>.mixed_precision=bf16`):
   stage time, every check, and each dev RR@10, to set beside the CPU run's (README). Then exact (flat) search of the
   run's stage-2 index through `reprolib.index.search`, faiss on the GPU against faiss on the CPU (2,000 of its own
   passage vectors as queries, top 100): how much of the top 10 they share.
2. search: faiss IndexFlatIP on the GPU against the CPU at a size the CPU feels: 1M random unit vectors of 768 dims,
   2,000 queries, top 100: queries per second and agreement of the top 10.
3. encode: forward passes of a BERT-base-sized encoder (12 layers x 768, random weights: only the shape matters) at
   MS MARCO's lengths, passages padded to 128 tokens and queries to 32, in fp32 and in bf16 autocast: texts per second
   and the hours 8.8M passages would take.

Needs, on the GPU machine, reprolib's dependencies (a machine without internet gets them as wheels carried with the
checkout) and a faiss built with GPU support; it checks them first and names what is missing. Each part writes its
JSON as soon as it is measured, and a part that fails records its error there instead of stopping the others. Without
CUDA it stops with exit status 2 and writes nothing. Not yet run on a GPU: checked on a CPU only, with
the GPU calls swapped for CPU ones (bench/README.md, "The GPU figures").
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchutil import REPO, RESULTS, header, top10_overlap, write_json

sys.path.insert(0, str(REPO))   # reprolib from this checkout, installed or not

TRAININGS = ("finetune", "finetune_hn", "finetune_bm25")   # the quickstart's stages that train


def missing_requirements():
    """What this machine lacks for the check, as short phrases; empty when it has everything."""
    import importlib.util

    import torch

    missing = [] if torch.cuda.is_available() else ["a CUDA device"]
    missing += [f"the {name} package" for name in ("transformers", "accelerate", "papermill", "ipykernel", "bm25s",
                                                   "ir_measures", "faiss") if importlib.util.find_spec(name) is None]
    if not missing:
        from reprolib.index import faiss_sees_gpus

        if not faiss_sees_gpus():
            missing.append("a faiss with GPU support")
    return missing


def quickstart(out_dir, save, timeout=480):
    """Run the quickstart on CUDA (its figures saved at once), then search its stage-2 index on the GPU and the CPU."""
    import torch

    from reprolib.index import search, shard_path

    work = Path(tempfile.mkdtemp(prefix="gpu_quickstart."))
    sets = [arg for stage in TRAININGS for arg in ("--set", f"{stage}.mixed_precision=bf16")]
    start = time.perf_counter()
    with open(out_dir / "gpu_quickstart.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "reprolib", "run", str(REPO / "params" / "quickstart.yaml"),
                               "--out", str(work), *sets], stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the quickstart failed (exit {done.returncode}): see gpu_quickstart.log")
    run_dir = work / "quickstart"
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    checks = json.loads((run_dir / "checks.json").read_text())
    figures = {
        **header("gpu_quickstart"), "device": torch.cuda.get_device_name(0), "wall_s": round(wall, 1),
        "stage_s": round(sum(s.get("wall_s") or 0 for s in stages.values()), 1),   # None: not timed
        "stages": {sid: {"wall_s": s.get("wall_s"), "RR@10": (s.get("metrics") or {}).get("RR@10")}
                   for sid, s in stages.items()},
        "checks": [{k: c.get(k) for k in ("stage", "reference_stage", "measured", "reference", "p_value", "status")}
                   for c in checks],
    }
    save(figures)

    index = run_dir / "index_hn" / "index"
    queries = np.load(shard_path(index, 0))[:2000].astype(np.float32)
    gpu_scores, gpu_positions = search(queries, index, topk=100, use_gpu=True)
    cpu_scores, cpu_positions = search(queries, index, topk=100, use_gpu=False)
    figures["flat_search_through_the_library"] = {
        "queries": len(queries), "top10_agreement_gpu_cpu": top10_overlap(gpu_positions, cpu_positions),
        "max_abs_score_difference": float(np.max(np.abs(gpu_scores - cpu_scores)))}
    return figures


def flat_search(num_vectors=1_000_000, dim=768, num_queries=2000, k=100):
    import torch

    from reprolib.index import require_faiss

    faiss = require_faiss()   # names faiss's OpenBLAS kernels first: the CPU side at its real speed

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((num_vectors, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[rng.choice(num_vectors, num_queries, replace=False)] + 0.1 * rng.standard_normal(
        (num_queries, dim), dtype=np.float32)
    cpu = faiss.IndexFlatIP(dim)
    cpu.add(vectors)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    timings, hits = {}, {}
    for name, index in (("gpu", gpu), ("cpu", cpu)):
        index.search(queries[:10], k)   # warm-up
        start = time.perf_counter()
        hits[name] = index.search(queries, k)[1]
        timings[name] = time.perf_counter() - start
    return {**header("gpu_flat_search"), "device": torch.cuda.get_device_name(0), "vectors": num_vectors, "dim": dim, "queries": num_queries, "topk": k,
            "faiss": faiss.__version__, "cpu_threads": faiss.omp_get_max_threads(),
            "queries_per_second": {name: round(num_queries / t, 1) for name, t in timings.items()},
            "gpu_speedup": round(timings["cpu"] / timings["gpu"], 1),
            "top10_agreement_gpu_cpu": top10_overlap(hits["gpu"], hits["cpu"])}


def encode(batches=20):
    import torch
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig()).cuda().eval()   # BERT-base: 12 x 768, 110M parameters
    figures = {}
    for kind, length, batch_size in (("passages", 128, 256), ("queries", 32, 1024)):
        ids = torch.randint(1000, 30000, (batch_size, length), device="cuda")
        mask = torch.ones_like(ids)
        for precision in ("fp32", "bf16"):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                model(input_ids=ids, attention_mask=mask)   # warm-up
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(batches):
                    model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0].float()
                torch.cuda.synchronize()
            rate = batches * batch_size / (time.perf_counter() - start)
            figures[f"{kind}_{precision}"] = {"tokens": length, "batch_size": batch_size, "per_second": round(rate)}
    hours = {p: round(8_841_823 / figures[f"passages_{p}"]["per_second"] / 3600, 2) for p in ("fp32", "bf16")}
    return {**header("gpu_encode"), "device": torch.cuda.get_device_name(0), "model": "BERT-base shape, random weights",
            **figures, "hours_for_msmarco_passages": hours}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=("quickstart", "search", "encode"))
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    missing = missing_requirements()
    if missing:
        print(f"gpu_check: this machine lacks {', '.join(missing)}; nothing measured")
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    parts = (("quickstart", "gpu_quickstart", lambda save: quickstart(args.out_dir, save)),
             ("search", "gpu_flat_search", lambda save: flat_search()), ("encode", "gpu_encode", lambda save: encode()))
    for part, name, measure in parts:
        if part in args.skip:
            continue
        path = args.out_dir / f"{name}.json"
        figures = {}

        def save(measured):
            figures.update(measured)
            write_json(path, figures)

        try:
            save(measure(save))
        except Exception as error:   # record it and go on: the other parts' figures still come back
            failed += 1
            save({**(figures or header(name)), "error": f"{type(error).__name__}: {error}"})
        print(json.dumps(figures, indent=1)[:2000])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
