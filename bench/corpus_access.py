"""Benchmark: can a large corpus be read and iterated without holding every passage as a Python string?

    .venv/bin/python bench/corpus_access.py                       # 1M passages -> bench/results/corpus_access.json
    .venv/bin/python bench/corpus_access.py --num-passages 20000 --out /tmp/quick.json

Generates a synthetic corpus.tsv (MS MARCO layout, untimed for the comparison but its time is recorded),
then runs each measured phase in its own fresh Python process, so that process's peak RSS belongs to
that phase alone:

    build    first Corpus.open(corpus.tsv): read + validate + index into the memory-mapped store
    iterate  reopen the store, read id, title and text of every passage
    lookup   100k random passage ids -> positions, in one positions() call and one id per call
    naive    the approach the store replaces: corpus.tsv into a dict {pid: (title, text)} of Python strings

The orchestrating process imports only the standard library and never touches the corpus: on Linux a
child's ru_maxrss starts from the high-water mark of the process it was spawned from, so the parent has
to stay small. Each phase also reports VmHWM from /proc/self/status (a per-address-space peak, which
does not carry that inheritance) and its RssAnon/RssFile at the end of the phase: memory-mapped store
pages that were read count in RSS as RssFile (reclaimable page cache), Python strings as RssAnon.
"""
import argparse
import datetime
import hashlib
import json
import os
import random
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import machine, write_json

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "corpus_access.json"
PHASES = ("generate", "build", "iterate", "lookup", "naive")


# ---------------------------------------------------------------------------------------------
# Memory readings (Linux; ru_maxrss is KiB there).
# ---------------------------------------------------------------------------------------------
def _status():
    """VmHWM, VmRSS, RssAnon, RssFile of this process in MiB ({} where /proc is unavailable)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def _maxrss_mib():
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)


def _memory(before):
    """Peak and end-of-phase memory, with the reading taken before the measured work began."""
    status = _status()
    peak = _maxrss_mib()
    return {
        "peak_rss_mib": peak,                          # ru_maxrss of this phase's process
        "peak_rss_added_mib": round(peak - before["maxrss"], 1),  # what the measured work added
        "peak_rss_before_work_mib": before["maxrss"],  # same, after imports, before the work
        "vm_hwm_mib": status.get("VmHWM"),
        "end_rss_anon_mib": status.get("RssAnon"),
        "end_rss_file_mib": status.get("RssFile"),
        "rss_before_work_mib": before["status"].get("VmRSS"),
    }


def _before():
    return {"maxrss": _maxrss_mib(), "status": _status()}


# ---------------------------------------------------------------------------------------------
# Phases: each runs in a fresh process and prints one JSON object as its last stdout line.
# ---------------------------------------------------------------------------------------------
def phase_generate(args):
    from reprolib.data.synthetic import generate

    start = time.perf_counter()
    generate(args.data, num_passages=args.num_passages, num_train_queries=0, num_dev_queries=0,
             seed=args.seed, progress=False)
    seconds = time.perf_counter() - start
    corpus = Path(args.data) / "corpus.tsv"
    return {"seconds": round(seconds, 3), "passages_per_s": round(args.num_passages / seconds),
            "corpus_bytes": corpus.stat().st_size}


def phase_build(args):
    from reprolib.data.corpus import Corpus, cache_root

    corpus_file = Path(args.data) / "corpus.tsv"
    shutil.rmtree(cache_root() / "corpus", ignore_errors=True)  # make sure this open builds
    before = _before()
    start = time.perf_counter()
    corpus = Corpus.open(corpus_file, progress=False)
    seconds = time.perf_counter() - start
    assert len(corpus) == args.num_passages, (len(corpus), args.num_passages)
    store_bytes = sum(p.stat().st_size for p in corpus.store_dir.iterdir())
    return {"seconds": round(seconds, 3), "passages_per_s": round(len(corpus) / seconds),
            "store_bytes": store_bytes, **_memory(before)}


def phase_iterate(args):
    from reprolib.data.corpus import Corpus

    before = _before()
    start = time.perf_counter()
    corpus = Corpus.open(Path(args.data) / "corpus.tsv", progress=False)
    open_seconds = time.perf_counter() - start
    n = len(corpus)
    chars = 0
    start = time.perf_counter()
    for i in range(n):
        pid, title, text = corpus.id(i), corpus.title(i), corpus.text(i)
        chars += len(pid) + len(title) + len(text)
    seconds = time.perf_counter() - start
    assert n == args.num_passages
    return {"open_seconds": round(open_seconds, 4), "seconds": round(seconds, 3),
            "passages_per_s": round(n / seconds), "chars_read": chars, **_memory(before)}


def phase_lookup(args):
    import numpy as np
    from reprolib.data.corpus import Corpus

    corpus = Corpus.open(Path(args.data) / "corpus.tsv", progress=False)
    rng = random.Random(args.seed)
    want = [rng.randrange(len(corpus)) for _ in range(args.lookups)]
    pids = [corpus.id(i) for i in want]  # real ids of random passages (hits)
    before = _before()

    start = time.perf_counter()
    got = corpus.positions(pids)
    batch_seconds = time.perf_counter() - start
    assert np.array_equal(got, want), "positions() returned wrong positions"

    start = time.perf_counter()
    single = [int(corpus.positions([pid])[0]) for pid in pids]
    single_seconds = time.perf_counter() - start
    assert single == want

    misses = [f"missing-{i}" for i in range(1000)]
    assert (corpus.positions(misses) == -1).all()
    return {"lookups": len(pids), "batch_seconds": round(batch_seconds, 4),
            "batch_lookups_per_s": round(len(pids) / batch_seconds),
            "single_seconds": round(single_seconds, 3), "single_lookups_per_s": round(len(pids) / single_seconds),
            **_memory(before)}


def phase_naive(args):
    import numpy  # noqa: F401 -- same imports as the other phases, so absolute peaks compare
    import reprolib.data.corpus  # noqa: F401

    before = _before()
    start = time.perf_counter()
    passages = {}
    with open(Path(args.data) / "corpus.tsv", encoding="utf-8") as f:
        for line in f:
            pid, title, text = line.rstrip("\n").split("\t")
            passages[pid] = (title, text)
    seconds = time.perf_counter() - start
    assert len(passages) == args.num_passages
    return {"seconds": round(seconds, 3), "passages_per_s": round(len(passages) / seconds), **_memory(before)}


# ---------------------------------------------------------------------------------------------
# Orchestration (standard library only, so spawned phases inherit a small RSS high-water mark).
# ---------------------------------------------------------------------------------------------
def _run_phase(name, args, env):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--data", str(args.data),
           "--num-passages", str(args.num_passages), "--seed", str(args.seed), "--lookups", str(args.lookups)]
    print(f"[{name}] ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"phase {name} failed with exit status {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"[{name}] {time.perf_counter() - start:.1f}s  {result}", file=sys.stderr, flush=True)
    return result


def _versions(env):
    code = "import numpy, reprolib; print(numpy.__version__, reprolib.__version__)"
    out = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
    numpy_version, reprolib_version = out.stdout.split() if out.returncode == 0 else (None, None)
    corpus_py = REPO / "reprolib" / "data" / "corpus.py"
    return {"numpy": numpy_version, "reprolib": reprolib_version,
            "corpus_py_sha256": hashlib.sha256(corpus_py.read_bytes()).hexdigest()[:16]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-passages", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the corpus and its store go (default: a temp dir, removed afterwards)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lookups", type=int, default=100_000)
    parser.add_argument("--keep", action="store_true", help="keep a temp workdir")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: run one phase
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase:
        result = globals()[f"phase_{args.phase}"](args)
        print(json.dumps(result))
        return

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="corpus_access.")) if temporary else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args.data = workdir / "data"
    env = {**os.environ, "REPROLIB_CACHE": str(workdir / "cache"), "PYTHONPATH": str(REPO)}
    try:
        started = datetime.datetime.now(datetime.timezone.utc)
        if (args.data / "corpus.tsv").exists() and (args.data / "synthetic.json").exists() and \
                json.loads((args.data / "synthetic.json").read_text()).get("num_passages") == args.num_passages \
                and json.loads((args.data / "synthetic.json").read_text()).get("seed") == args.seed:
            phases = {"generate": {"reused": True, "corpus_bytes": (args.data / "corpus.tsv").stat().st_size}}
        else:
            phases = {"generate": _run_phase("generate", args, env)}
        for name in PHASES[1:]:
            phases[name] = _run_phase(name, args, env)
    finally:
        if temporary and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    n = args.num_passages
    results = {
        "benchmark": "corpus_access",
        "date": started.isoformat(timespec="seconds"),
        "command": command,
        "num_passages": n,
        "seed": args.seed,
        "corpus_file_bytes": phases["generate"]["corpus_bytes"],
        "machine": machine(),
        "versions": _versions(env),
        "orchestrator_peak_rss_mib": _maxrss_mib(),
        "summary": {
            "build_passages_per_s": phases["build"]["passages_per_s"],
            "build_peak_rss_mib": phases["build"]["peak_rss_mib"],
            "iterate_passages_per_s": phases["iterate"]["passages_per_s"],
            "iterate_peak_rss_mib": phases["iterate"]["peak_rss_mib"],
            "iterate_end_rss_anon_mib": phases["iterate"]["end_rss_anon_mib"],
            "lookup_batch_lookups_per_s": phases["lookup"]["batch_lookups_per_s"],
            "lookup_single_lookups_per_s": phases["lookup"]["single_lookups_per_s"],
            "naive_dict_peak_rss_mib": phases["naive"]["peak_rss_mib"],
            "naive_dict_end_rss_anon_mib": phases["naive"]["end_rss_anon_mib"],
            "naive_dict_passages_per_s": phases["naive"]["passages_per_s"],
        },
        "phases": phases,
        "notes": [
            "Each phase ran in a fresh process; peak_rss_mib is that process's ru_maxrss, "
            "peak_rss_before_work_mib the same after imports (interpreter + numpy), before the measured work.",
            "vm_hwm_mib is /proc/self/status VmHWM, the peak of the phase's own address space.",
            "Memory-mapped store pages that were read count in RSS as RssFile (page cache, reclaimable); "
            "Python objects are RssAnon. The page cache was warm: corpus and store had just been written.",
        ],
    }
    write_json(args.out, results)
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
