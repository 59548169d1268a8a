"""Benchmark: peak RSS and passages/s of `reprolib encode` on large synthetic corpora, with a tiny BERT.

    .venv/bin/python bench/encode_rss.py                       # 100k and 1M passages -> bench/results/encode_rss.json
    .venv/bin/python bench/encode_rss.py --sizes 20000 --out /tmp/quick.json

For each size: a child process writes a synthetic corpus.tsv (`reprolib.data.synthetic.generate`, no
queries, so no BM25) and builds its memory-mapped store; another builds a tiny random BERT (WordPiece
vocabulary trained on the first corpus passages); then the command itself,

    python -m reprolib encode --model M --corpus C --out INDEX --batch-size 256 --max-len 32

runs as a child of this process, which imports only the standard library. Its peak RSS is the
ru_maxrss that os.wait4 returns for that child alone; VmRSS is sampled from /proc every second while
it runs (RssAnon: Python objects and tensors; RssFile: pages of the memory-mapped corpus store and
libraries, reclaimable page cache), to show memory staying flat as the shards go by. passages/s counts the command's whole wall
time (start-up and model load included) and, as `steady`, the time between the first and the last
shard file.
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

from benchutil import REPO, RESULTS, header, load_average, write_json

TARGET_MIB = 2048
MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
         "vocab_size": 4000, "max_len": 32}


# ---------------------------------------------------------------------------------------------
# Children: each runs in a fresh process (python encode_rss.py --phase NAME ...).
# ---------------------------------------------------------------------------------------------
def phase_data(args):
    from reprolib.data.corpus import Corpus
    from reprolib.data.synthetic import generate

    start = time.perf_counter()
    generate(args.data, num_passages=args.num_passages, num_train_queries=0, num_dev_queries=0, seed=0, progress=False)
    Corpus.open(args.data, progress=False)  # build the store now, so the encode run only encodes
    return {"seconds": round(time.perf_counter() - start, 1)}


def phase_model(args):
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from reprolib.data.corpus import Corpus
    from reprolib.modeling import DenseEncoder

    corpus = Corpus.open(args.data, progress=False)
    out = Path(args.model)
    out.mkdir(parents=True)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator((f"{corpus.title(i)} {corpus.text(i)}" for i in range(min(len(corpus), 20_000))),
                                  vocab_size=MODEL["vocab_size"], show_progress=False)
    wordpiece.save_model(str(out))
    tokenizer = BertTokenizerFast(vocab=str(out / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=64,
                        **{k: MODEL[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                 "intermediate_size")})
    encoder = DenseEncoder(BertModel(config), tokenizer, pooling="mean", normalize=True,
                           query_max_len=MODEL["max_len"], passage_max_len=MODEL["max_len"])
    encoder.save(out)
    return {"parameters": sum(p.numel() for p in encoder.parameters())}


def _run_phase(name, env, **options):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"phase {name} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The measured command.
# ---------------------------------------------------------------------------------------------
def _rss_mib(pid):
    """[VmRSS, RssAnon, RssFile] of a running process in MiB, or None once it is gone."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    fields[key] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        return None
    return [fields.get(k) for k in ("VmRSS", "RssAnon", "RssFile")]


def measure_encode(data, model, index, env, batch_size, shard_size):
    cmd = [sys.executable, "-m", "reprolib", "encode", "--model", str(model), "--corpus", str(data), "--out", str(index),
           "--batch-size", str(batch_size), "--max-len", str(MODEL["max_len"]), "--shard-size", str(shard_size)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    samples = []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss = _rss_mib(proc.pid)
        if rss is not None and rss[0]:  # (0 until the new process has mapped anything)
            samples.append([round(time.perf_counter() - start, 1), *rss])
        time.sleep(1.0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = proc.stdout.read()
    if proc.returncode:
        sys.exit(f"reprolib encode failed with exit status {proc.returncode}")
    meta = json.loads((Path(index) / "index.json").read_text())
    shards = sorted(Path(index).glob("shard_*.npy"), key=lambda p: p.stat().st_mtime)
    steady = None
    if len(shards) > 1:  # the passages of every shard but the first, over the time between first and last
        span = shards[-1].stat().st_mtime - shards[0].stat().st_mtime
        steady = round((meta["num_passages"] - meta["shard_size"]) / span) if span > 0 else None
    return {
        "command": " ".join(["python"] + cmd[1:]),
        "stdout": output.strip(),
        "seconds": round(seconds, 1),
        "passages_per_s": round(meta["num_passages"] / seconds),
        "steady_passages_per_s": steady,
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
        "max_sampled_rss_anon_mib": max((row[2] for row in samples), default=None),
        "max_sampled_rss_file_mib": max((row[3] for row in samples), default=None),
        "rss_samples": {"columns": ["seconds", "VmRSS_mib", "RssAnon_mib", "RssFile_mib"], "rows": samples},
        "num_shards": meta["num_shards"], "dim": meta["dim"], "dtype": meta["dtype"],
        "index_bytes": sum(p.stat().st_size for p in shards),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the encode process")
    parser.add_argument("--workdir", type=Path, help="default: a temp dir, removed afterwards")
    parser.add_argument("--out", type=Path, default=RESULTS / "encode_rss.json")
    parser.add_argument("--phase", choices=["data", "model"], help=argparse.SUPPRESS)  # internal: run one child
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--num-passages", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        print(json.dumps(globals()[f"phase_{args.phase}"](args)))
        return

    result = header("encode_rss")
    workdir = Path(tempfile.mkdtemp(prefix="encode_rss.")) if args.workdir is None else args.workdir.resolve()
    env = {**os.environ, "REPROLIB_CACHE": str(workdir / "cache"), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": str(args.threads)}
    runs = {}
    try:
        model = workdir / "model"
        for size in sorted(args.sizes):
            data = workdir / f"data-{size}"
            print(f"[{size}] corpus ...", file=sys.stderr, flush=True)
            prepared = _run_phase("data", env, data=data, num_passages=size)
            if not model.exists():  # one model for every size, its vocabulary from the smallest corpus
                print("model ...", file=sys.stderr, flush=True)
                result["model"] = {**MODEL, **_run_phase("model", env, data=data, model=model)}
            print(f"[{size}] reprolib encode ...", file=sys.stderr, flush=True)
            runs[str(size)] = {"corpus_seconds": prepared["seconds"],
                               **measure_encode(data, model, workdir / f"index-{size}", env, args.batch_size,
                                                args.shard_size)}
            print(f"[{size}] {({k: v for k, v in runs[str(size)].items() if k != 'rss_samples'})}",
                  file=sys.stderr, flush=True)
            shutil.rmtree(data, ignore_errors=True)
            shutil.rmtree(workdir / f"index-{size}", ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    largest = runs[str(max(args.sizes))]
    result.update({
        "settings": {"batch_size": args.batch_size, "shard_size": args.shard_size, "max_len": MODEL["max_len"],
                     "omp_num_threads": args.threads, "index_dtype": "float16 (the default)"},
        "summary": {
            **{f"peak_rss_mib_{size}": runs[str(size)]["peak_rss_mib"] for size in sorted(args.sizes)},
            **{f"max_sampled_rss_anon_mib_{size}": runs[str(size)]["max_sampled_rss_anon_mib"] for size in sorted(args.sizes)},
            **{f"passages_per_s_{size}": runs[str(size)]["passages_per_s"] for size in sorted(args.sizes)},
            "target_peak_rss_mib": TARGET_MIB,
            "under_target": largest["peak_rss_mib"] < TARGET_MIB,
        },
        "runs": runs,
        "load_average_at_end": load_average(),
        "notes": ["peak_rss_mib is ru_maxrss of the `reprolib encode` process (os.wait4), which holds one shard "
                  "of texts and embeddings at a time; the corpus store is memory-mapped, and the store pages it "
                  "has read count in RssFile (page cache the kernel can reclaim)."],
    })
    write_json(args.out, result)
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
