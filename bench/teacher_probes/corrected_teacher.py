"""The teacher's scores with its top-1 mistakes corrected, for the Disentangled miniature's KL student.

Where a negative scores at or above a query's labelled positive, the positive is raised to the best negative's
score plus the teacher's mean margin (`reprolib.search.mean_margin`); every other score, and the file's order,
stays. Distilled in place of the teacher, it tells the cost of the teacher's mistakes from the cost of its graded
scores of the negatives (bench/README.md, "What the teacher adds beyond the labels").

    .venv/bin/python bench/teacher_probes/corrected_teacher.py outputs/dis/miniature_disentangled \
        outputs/corrected_teacher.tsv [--flatten-negatives]
"""
import argparse
from pathlib import Path

from reprolib.data import read_qrels, read_scores, write_scores
from reprolib.search import mean_margin, relevant_ids


def corrected(teacher, qrels):
    """(scores, queries corrected): a copy of `teacher` with each mis-ranked positive raised above its best negative.
    Raising it also sharpens that query's target a little: the correction is not only of the ranking."""
    margin = mean_margin(teacher, qrels)
    scores, fixed = {}, 0
    for qid, hits in teacher.items():
        relevant = relevant_ids(qrels, qid)
        best = max((score for pid, score in hits.items() if pid not in relevant), default=None)
        scores[qid] = {pid: best + margin if pid in relevant and best is not None and score <= best else score
                       for pid, score in hits.items()}
        fixed += scores[qid] != hits
    return scores, fixed


def flattened(scores, qrels):
    """`scores` with each query's negatives set to their mean: the positive keeps its margin over them on average,
    the ordering among the negatives is gone."""
    out = {}
    for qid, hits in scores.items():
        relevant = relevant_ids(qrels, qid)
        negatives = [score for pid, score in hits.items() if pid not in relevant]
        level = sum(negatives) / len(negatives) if negatives else 0.0
        out[qid] = {pid: score if pid in relevant else level for pid, score in hits.items()}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the miniature's run folder (its teacher/ and data/ stages)")
    parser.add_argument("out", help="the corrected teacher-scores file to write")
    parser.add_argument("--flatten-negatives", action="store_true",
                        help="then give each query's negatives their mean score: the teacher's grading of them removed")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    teacher = read_scores(run_dir / "teacher" / "teacher_scores.tsv")
    qrels = read_qrels(run_dir / "data" / "qrels.train.tsv")
    scores, fixed = corrected(teacher, qrels)
    if args.flatten_negatives:
        scores = flattened(scores, qrels)
    write_scores(args.out, scores)
    print(f"{fixed:,} of {len(scores):,} queries had a negative at or above their positive; written to {args.out}")


if __name__ == "__main__":
    main()
