"""How a teacher ranks the training queries against their true labels, where the labels it was given are wrong.

For the Disentangled miniature run on `mislabel.py`'s data (`cross_fit.yaml`): each teacher's fused training run
(its training runs fused at the weight its notebook 41 picked) scored against the true labels and against the moved
ones, and, for the queries whose label was moved, how often it puts the true passage first and above the wrong label.

    .venv/bin/python bench/teacher_probes/label_agreement.py outputs/dis_cf/miniature_disentangled \
        <a clean synthetic data folder>/qrels.train.tsv
"""
import argparse
import json
from pathlib import Path

from reprolib.data import read_qrels, read_run
from reprolib.metrics import evaluate
from reprolib.search import fuse_runs

TEACHERS = {"teacher": ["dense_hn_train"], "teacher_cf": ["oof_f0", "oof_f1"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the pipeline's run folder (outputs/<out>/miniature_disentangled)")
    parser.add_argument("true_qrels", help="the training labels before any was moved")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    true, given = read_qrels(args.true_qrels), read_qrels(run_dir / "data" / "qrels.train.tsv")
    moved = [qid for qid in given if given[qid] != true[qid]]
    print(f"{len(moved):,} of {len(given):,} training labels moved; the labels are right for "
          f"{1 - len(moved) / len(given):.1%} of the queries")
    bm25 = read_run(run_dir / "bm25_train" / "run.trec")
    for teacher, dense_stages in TEACHERS.items():
        weight = json.loads((run_dir / teacher / "metrics.json").read_text())["weight"]
        fused = fuse_runs(read_run([run_dir / stage / "run.trec" for stage in dense_stages]), bm25, weight)
        rr = {name: evaluate(fused, qrels, metrics="RR@10").aggregate["RR@10"] for name, qrels in
              (("true", true), ("given", given))}
        first = sum(max(fused[q], key=fused[q].get) in true[q] for q in moved)
        above = sum(_score(fused[q], true[q]) > _score(fused[q], given[q]) for q in moved)
        print(f"{teacher:10s} weight {weight}: RR@10 {rr['true']:.4f} on the true labels, {rr['given']:.4f} on "
              f"the given; moved queries: the true passage first {first:,}, above the wrong label {above:,} "
              f"({above / len(moved):.0%})")


def _score(hits, judged):
    return hits.get(next(iter(judged)), float("-inf"))


if __name__ == "__main__":
    main()
