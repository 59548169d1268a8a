"""Rehearsal: every MS MARCO recipe's data path at full size, with a micro model, for time and peak memory.

    .venv/bin/reprolib data prepare synthetic-msmarco --out /work/scale/msmarco         # ~15 min, ~12 GB
    .venv/bin/python bench/scale_rehearsal.py --data /work/scale/msmarco --work /work/scale/work
    .venv/bin/python bench/scale_rehearsal.py ... --steps encode,search_dev           # some steps only
    .venv/bin/python bench/scale_rehearsal.py ... --redo bm25                          # measure one again

Each step runs as a child process tree: the `reprolib` command a recipe's stage runs, or a few library calls
where no command exists (pretraining data, group sampling, teacher pairs). This process samples the tree's
summed RSS twice a second and kills it above `--cap-gib` (the step is then recorded as over the cap, with the
RSS it reached). Results go to bench/results/scale_rehearsal.json after every step; a rerun skips the steps
recorded there with the same data (resumable). Work linear in the number of train queries (BM25 negatives,
mining by search) runs on a sample of them and is extrapolated; the corpus is always full size.

Goal (issue 17): every step under 8 GiB at 8.8M passages, and memory flat in the corpus size apart from the
index itself.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchutil import RESULTS, header, load_average, write_json

TARGET_GIB = 8
SAMPLE_QUERIES = 5000           # train queries for the per-query steps, extrapolated to all of them
REPROLIB = [sys.executable, "-m", "reprolib"]


def steps(data, work):
    """name -> (what it rehearses, argv). Children of this script run the library calls."""
    child = [sys.executable, str(Path(__file__).resolve()), "--data", str(data), "--work", str(work), "--child"]
    micro = work / "micro-dense" / "model"
    return {
        "validate": ("reprolib data validate: corpus store (built on first open), queries, qrels, negatives",
                     REPROLIB + ["data", "validate", str(data)]),
        "bm25": ("BM25 index of the corpus (reprolib.bm25), dev queries top 1000, BM25 negatives for a sample of train "
                 "queries (extrapolated)", child + ["bm25"]),
        "pretrain_retromae": ("RetroMAE pretraining: sequences of the whole corpus, masks, 3 steps (micro BERT)",
                              REPROLIB + ["train", str(work / "pretrain_retromae.yaml")]),
        "pretrain_lexmae": ("LexMAE pretraining: sequences of the whole corpus, masks, 3 steps (micro BERT)",
                            REPROLIB + ["train", str(work / "pretrain_lexmae.yaml")]),
        "groups_retromae": ("contrastive training groups, RetroMAE sampler, BM25 negatives, 3 steps; writes the "
                            "micro dense model the later steps use", REPROLIB + ["train", str(work / "groups_retromae.yaml")]),
        "groups_teacher": ("Disentangled distillation: Tevatron sampler over the union negatives, teacher scores "
                           "from the sentence-transformers pickle, Margin-MSE, 3 steps",
                           REPROLIB + ["train", str(work / "groups_teacher.yaml")]),
        "encode": ("reprolib encode: the whole corpus into 100k-passage shards (micro model, max length 32)",
                   REPROLIB + ["encode", "--model", str(micro), "--corpus", str(data), "--out", str(work / "index"),
                               "--batch-size", "512", "--max-len", "32"]),
        "search_dev": ("reprolib search: exact dense top 1000 for the dev queries",
                       REPROLIB + ["search", "--model", str(micro), "--index", str(work / "index"), "--queries",
                                   str(data), "--split", "dev", "--topk", "1000", "--out", str(work / "dense.dev.trec")]),
        "evaluate": ("reprolib evaluate: the dev run against the dev qrels",
                     REPROLIB + ["evaluate", str(work / "dense.dev.trec"), str(data / "qrels.dev.tsv"),
                                 "--metrics", "RR@10 R@1000"]),
        "mine_sample": ("hard-negative mining by search: top 200 of a sample of train queries (extrapolated), "
                        "then reprolib mine-negatives", child + ["mine_sample"]),
        "mine_run": ("reprolib mine-negatives over the full mined top-200 run (100M lines)",
                     REPROLIB + ["mine-negatives", "--run", str(data / "train.mined.trec"), "--qrels",
                                 str(data / "qrels.train.tsv"), "--out", str(work / "mined.negatives.tsv"),
                                 "--depth", "200"]),
        "teacher_pairs": ("the teacher's scoring input (reprolib score --run): every train query's positives + "
                          "first 200 mined passages, one pass, then the texts of 1,000 queries", child + ["teacher_pairs"]),
    }


def training_configs(data, work):
    """The `reprolib train` configs of the training steps, as the recipe YAMLs set them (micro sizes)."""
    common = {"train_data": str(data), "max_steps": 3, "log_steps": 1, "tensorboard": False, "progress": False,
              "learning_rate": 1e-4}
    pretrain = {**common, "model": "scratch:micro", "batch_size": 32}
    groups = {**common, "model": "scratch:micro", "batch_size": 16, "query_max_len": 32, "passage_max_len": 64}
    return {
        "pretrain_retromae": {**pretrain, "objective": "retromae", "out_dir": str(work / "pretrain_retromae"),
                              "template": "retromae_pretrain"},
        "pretrain_lexmae": {**pretrain, "objective": "lexmae", "out_dir": str(work / "pretrain_lexmae"),
                            "template": "lexmae"},
        "groups_retromae": {**groups, "objective": "contrastive", "out_dir": str(work / "micro-dense"),
                            "sampler": "retromae", "group_size": 8},
        "groups_teacher": {**groups, "objective": "contrastive", "out_dir": str(work / "groups_teacher"),
                           "sampler": "tevatron", "group_size": 4,
                           "negatives": str(data / "hard-negatives" / "train.negatives.union.tsv"),
                           "teacher_scores": str(data / "hard-negatives" / "train.ce_scores.pkl.gz"),
                           "distillation": "margin_mse", "contrastive_weight": 0.0},
    }


# ---------------------------------------------------------------------------------------------
# Children: library calls where no command exists. Each prints one JSON line of sub-timings.
# ---------------------------------------------------------------------------------------------
def _sample(queries, size):
    import random

    qids = sorted(queries)
    keep = sorted(random.Random(0).sample(qids, min(size, len(qids))))
    return {q: queries[q] for q in keep}


def child_bm25(data, work):
    from reprolib.data import Corpus, write_run
    from reprolib.data.formats import read_qrels, read_queries, write_negatives
    from reprolib.search import bm25_index, bm25_retrieve, mine_negatives

    timings = {}
    t = time.perf_counter()
    corpus = Corpus.open(data, progress=False)
    index = bm25_index(corpus, progress=False)
    timings["index_s"] = time.perf_counter() - t
    t = time.perf_counter()
    write_run(work / "bm25.dev.trec", bm25_retrieve(index, corpus, read_queries(data / "dev.query.txt"), topk=1000,
                                                    progress=False), tag="bm25")
    timings["dev_s"] = time.perf_counter() - t
    t = time.perf_counter()
    train = read_queries(data / "train.query.txt")
    sample = _sample(train, SAMPLE_QUERIES)
    run = bm25_retrieve(index, corpus, sample, topk=200, progress=False)
    write_negatives(work / "bm25.negatives.sample.tsv", mine_negatives(run, read_qrels(data / "qrels.train.tsv"), depth=200))
    timings["train_sample_s"] = time.perf_counter() - t
    timings["train_all_s_extrapolated"] = timings["train_sample_s"] * len(train) / len(sample)
    return timings


def child_mine_sample(data, work):
    from reprolib.data.formats import read_queries, write_queries

    train = read_queries(data / "train.query.txt")
    sample = _sample(train, SAMPLE_QUERIES)
    write_queries(work / "train.sample.query.txt", sample)
    timings = {}
    for what, argv in (("search_s", ["search", "--model", str(work / "micro-dense" / "model"), "--index", str(work / "index"),
                                     "--queries", str(work / "train.sample.query.txt"), "--topk", "200",
                                     "--out", str(work / "dense.train.sample.trec")]),
                       ("mine_s", ["mine-negatives", "--run", str(work / "dense.train.sample.trec"), "--qrels",
                                   str(data / "qrels.train.tsv"), "--out", str(work / "dense.negatives.sample.tsv"),
                                   "--depth", "200"])):
        t = time.perf_counter()
        subprocess.run(REPROLIB + argv, check=True, stdout=subprocess.DEVNULL)
        timings[what] = time.perf_counter() - t
    timings["all_train_queries_s_extrapolated"] = (timings["search_s"] + timings["mine_s"]) * len(train) / len(sample)
    return timings


def child_teacher_pairs(data, work):
    """What `reprolib score --run train.mined.trec` does before its first batch: the qrels, then one pass over
    the pairs (the request digest), then the texts of the first chunks (here 1,000 queries)."""
    from reprolib.data import Corpus
    from reprolib.data.formats import read_qrels, read_queries
    from reprolib.data.templates import get_template
    from reprolib.rerank import TeacherPairs, _request_digest

    timings = {}
    t = time.perf_counter()
    pairs = TeacherPairs(read_qrels(data / "qrels.train.tsv"), data / "train.mined.trec", depth=200)
    _, count = _request_digest(None, pairs, "plain")         # the score command's pass (no model: no weights digest)
    timings["one_pass_s"], timings["pairs"] = time.perf_counter() - t, count
    t = time.perf_counter()
    queries, corpus, render = read_queries(data / "train.query.txt"), Corpus.open(data, progress=False), \
        get_template("plain").render
    texts = 0
    for number, (qid, pids) in enumerate(pairs):
        if number == 1000:
            break
        texts += sum(len(queries[qid]) + len(render(corpus.title(int(p)), corpus.text(int(p)), sep="[SEP]"))
                     for p in corpus.positions(pids))
    timings["texts_of_1000_queries_s"], timings["characters"] = time.perf_counter() - t, texts
    return timings


CHILDREN = {"bm25": child_bm25, "mine_sample": child_mine_sample, "teacher_pairs": child_teacher_pairs}


# ---------------------------------------------------------------------------------------------
# The parent: run a step's process tree, sample its RSS, kill it above the cap.
# ---------------------------------------------------------------------------------------------
def tree_rss(pid):
    """Summed RSS (bytes) of `pid` and its descendants, from /proc."""
    children, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def run_step(argv, cap_bytes, log_path):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    start, peak, over = time.perf_counter(), 0, False
    samples = []
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while process.poll() is None:
            rss = tree_rss(process.pid)
            peak = max(peak, rss)
            if not samples or time.perf_counter() - start - samples[-1][0] >= 10:
                samples.append([round(time.perf_counter() - start, 1), round(rss / 2**30, 3)])
            if rss > cap_bytes:
                over = True
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                break
            time.sleep(0.5)
    seconds = time.perf_counter() - start
    tail = Path(log_path).read_text(errors="replace").splitlines()[-5:]
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(peak / 2**30, 3), "over_cap": over,
            "exit_code": process.returncode, "rss_samples_every_10s_gib": samples, "output_tail": tail}


def _identity(stats):
    """What the data is (sizes, seed), without how long it took to write (regenerating a file changes that)."""
    return {k: v for k, v in (stats or {}).items() if k not in ("seconds", "total_seconds")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="from `reprolib data prepare synthetic-msmarco`")
    parser.add_argument("--work", type=Path, required=True, help="where the steps write (indexes, runs, models)")
    parser.add_argument("--steps", help="comma-separated subset, in the listed order")
    parser.add_argument("--redo", default="", help="comma-separated steps to measure again")
    parser.add_argument("--cap-gib", type=float, default=14.0, help="kill a step whose process tree exceeds this")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale_rehearsal.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data, work = args.data.resolve(), args.work.resolve()
    if args.child:
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                          for k, v in CHILDREN[args.child](data, work).items()}))
        return

    work.mkdir(parents=True, exist_ok=True)
    configs = training_configs(data, work)
    for name, config in configs.items():
        import yaml   # noqa: the parent stays light until here; yaml is small

        (work / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    stats = json.loads((data / "msmarco_scale.json").read_text())
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if _identity(results.get("data")) != _identity(stats):      # other data: start afresh
        results = {"steps": {}}
    results["data"] = stats
    results.update({k: v for k, v in header("scale_rehearsal").items() if k != "load_average_at_start"})
    results.update(target_gib=TARGET_GIB, cap_gib=args.cap_gib, sample_queries=SAMPLE_QUERIES)
    table = steps(data, work)
    chosen = args.steps.split(",") if args.steps else list(table)
    unknown = [name for name in chosen + [r for r in args.redo.split(",") if r] if name not in table]
    if unknown:
        sys.exit(f"unknown steps {unknown}; the steps: {', '.join(table)}")
    for name in chosen:
        done = results["steps"].get(name)
        if done and done["exit_code"] == 0 and name not in args.redo.split(","):
            print(f"skip {name} (measured: {done['seconds']} s, {done['peak_rss_gib']} GiB)")
            continue
        what, argv = table[name]
        print(f"▶ {name}: {what}", flush=True)
        if name in configs:   # a training step measures a fresh run, not `reprolib train` finding its model done
            shutil.rmtree(configs[name]["out_dir"], ignore_errors=True)
        result = run_step(argv, args.cap_gib * 2**30, work / f"{name}.log")
        result.update(what=what, command=" ".join(argv).replace(sys.executable, "python"),
                      load_average_at_start=load_average())
        if name in CHILDREN and result["exit_code"] == 0:
            result["timings"] = json.loads(result["output_tail"][-1])
        result["under_target"] = result["exit_code"] == 0 and result["peak_rss_gib"] <= TARGET_GIB
        results["steps"][name] = result
        write_json(args.out, results)
        state = "OVER THE CAP" if result["over_cap"] else f"exit {result['exit_code']}"
        print(f"  {state}, {result['seconds']} s, peak {result['peak_rss_gib']} GiB", flush=True)


if __name__ == "__main__":
    main()
