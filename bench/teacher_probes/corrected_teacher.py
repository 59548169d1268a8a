"""The teacher's scores with its top-1 mistakes corrected, for the Disentangled miniature's KL student.

Where a negative scores at or above a query's labelled positive, the positive is raised to the best negative's
score plus the teacher's mean margin (`reprolib.search.label_scores`); every other score, and the file's order,
stays. Distilled in place of the teacher, it tells the cost of the teacher's mistakes from the cost of its graded
scores of the negatives (bench/README.md, "What the teacher adds beyond the labels").

    .venv/bin/python bench/teacher_probes/corrected_teacher.py outputs/dis/miniature_disentangled \
        outputs/corrected_teacher.tsv
"""
import argparse
from pathlib import Path

from reprolib.data import read_qrels, write_scores
from reprolib.search import label_scores


def read_scores(path):
    scores = {}
    for line in open(path):
        qid, pid, score = line.split()[:3]
        scores.setdefault(qid, {})[pid] = float(score)
    return scores


def corrected(teacher, qrels):
    """(scores, queries corrected): `teacher` with each mis-ranked positive raised above its best negative."""
    margin = max(v for hits in label_scores(teacher, qrels).values() for v in hits.values())
    fixed = 0
    for qid, hits in teacher.items():
        positives = [pid for pid in hits if qrels.get(qid, {}).get(pid, 0) > 0]
        negatives = [score for pid, score in hits.items() if pid not in positives]
        if not negatives:
            continue
        for pid in positives:
            if hits[pid] <= max(negatives):
                hits[pid] = max(negatives) + margin
                fixed += 1
    return teacher, fixed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the miniature's run folder (its teacher/ and data/ stages)")
    parser.add_argument("out", help="the corrected teacher-scores file to write")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    teacher = read_scores(run_dir / "teacher" / "teacher_scores.tsv")
    scores, fixed = corrected(teacher, read_qrels(run_dir / "data" / "qrels.train.tsv"))
    write_scores(args.out, scores)
    print(f"{fixed:,} of {len(scores):,} queries had a negative at or above their positive; written to {args.out}")


if __name__ == "__main__":
    main()
