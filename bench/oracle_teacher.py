"""Diagnostic: a perfect teacher for the Disentangled miniature, to tell a weak teacher from a weak loss.

    .venv/bin/python bench/oracle_teacher.py RUN_DIR OUT.tsv
        # RUN_DIR: a finished outputs/.../miniature_disentangled; OUT.tsv: teacher scores for notebook 70

The miniature's data (notebook 00 with `unlabelled_twins`) state each fact in several passages of an entity and
label one of them for a training query. The generator knows them all (`reprolib.data.synthetic.answers`, given the
data stage's seed, sizes and twins). This script rescores the teacher's pool (RUN_DIR/teacher/teacher_scores.tsv:
each training query's labelled answer and the teacher's top 20) with every answer at the labels' margin
(RUN_DIR/teacher/label_scores.tsv's) and every other passage at 0. A student taught these scores is taught exactly
what the labels leave out, and nothing wrong. Point a trial copy of the YAML's `distill` stage (`teacher_scores:`) at
OUT.tsv to train it.
"""
import json
import sys
from pathlib import Path

from reprolib.data import synthetic
from reprolib.data.formats import read_qrels, read_scores, write_scores


def main(run_dir, out):
    run_dir = Path(run_dir)
    params = json.loads((run_dir / "data" / "params.json").read_text())
    answers = synthetic.answers(num_passages=params["num_passages"], num_train_queries=params.get("num_train_queries"),
                                num_dev_queries=params["num_dev_queries"],
                                seed=params["seed"], unlabelled_twins=params["unlabelled_twins"],
                                twins_per_fact=params.get("twins_per_fact", 1))
    labelled = read_qrels(run_dir / "data" / "qrels.train.tsv")
    if not all(pids.keys() <= set(answers.get(qid, ())) for qid, pids in labelled.items()):
        raise SystemExit(f"{run_dir}/data: its training labels are not among the generator's answers (another seed?)")
    pool = read_scores(run_dir / "teacher" / "teacher_scores.tsv")
    margin = max(max(hits.values()) for hits in read_scores(run_dir / "teacher" / "label_scores.tsv").values())
    oracle = {qid: {pid: margin if pid in answers.get(qid, ()) else 0.0 for pid in hits} for qid, hits in pool.items()}
    write_scores(out, oracle)
    pairs = sum(map(len, oracle.values()))
    hits = sum(score > 0 for scores in oracle.values() for score in scores.values())
    print(f"{out}: {pairs} pairs of {len(labelled)} training queries, {hits} answers "
          f"({hits - sum(map(len, labelled.values()))} unlabelled) at {margin}, the rest at 0")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
