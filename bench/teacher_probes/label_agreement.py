"""How a teacher ranks the training queries against their true labels, where the labels it was given are wrong.

For the Disentangled miniature run on `mislabel.py`'s data (`cross_fit.yaml`): each teacher's fused training run
(its training runs fused at the weight its notebook 41 picked, the full top 100: the students see its top 20)
scored against the true labels and against the given ones; how often its first passage is the true one, over all
queries and over those whose label is right; and, for the queries whose label was moved, how often it puts the true
passage first and above the wrong label. The true labels are `mislabel.py`'s `qrels.train.true.tsv`, beside the
data the run's data stage links. Each synthetic query has one relevant passage.

    .venv/bin/python bench/teacher_probes/label_agreement.py outputs/dis_cf/miniature_disentangled
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
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    given_path = run_dir / "data" / "qrels.train.tsv"
    true = read_qrels(given_path.resolve().with_name("qrels.train.true.tsv"))
    given = read_qrels(given_path)
    moved = [qid for qid in given if given[qid] != true[qid]]
    kept = [qid for qid in given if given[qid] == true[qid]]
    print(f"{len(moved):,} of {len(given):,} training labels moved; the labels are right for "
          f"{1 - len(moved) / len(given):.1%} of the queries")
    bm25 = read_run(run_dir / "bm25_train" / "run.trec")
    for teacher, dense_stages in TEACHERS.items():
        weight = json.loads((run_dir / teacher / "metrics.json").read_text())["weight"]
        fused = fuse_runs(read_run([run_dir / stage / "run.trec" for stage in dense_stages]), bm25, weight)
        rr = {name: evaluate(fused, qrels, metrics="RR@10").aggregate["RR@10"] for name, qrels in
              (("true", true), ("given", given))}
        first = {q: max(fused[q], key=fused[q].get) in true[q] for q in given}
        above = sum(_score(fused[q], true[q]) > _score(fused[q], given[q]) for q in moved)
        print(f"{teacher:10s} weight {weight}: RR@10 {rr['true']:.4f} on the true labels, {rr['given']:.4f} on "
              f"the given; the true passage first for {sum(first.values()) / len(given):.1%} of the queries, "
              f"{sum(first[q] for q in kept) / len(kept):.1%} of those labelled right; of the moved: first "
              f"{sum(first[q] for q in moved):,}, above the wrong label {above:,} ({above / len(moved):.0%})")


def _score(hits, judged):
    return hits.get(next(iter(judged)), float("-inf"))


if __name__ == "__main__":
    main()
