"""The teacher's scores with its top-1 mistakes corrected, for the Disentangled miniature's KL student.

Where a negative scores at or above a query's labelled positive, the positive is raised to the best negative's
score plus the teacher's mean margin (`reprolib.search.mean_margin`); every other score, and the file's order,
stays. Distilled in place of the teacher, it tells the cost of the teacher's mistakes from the cost of its graded
scores of the negatives (bench/README.md, "What the teacher adds beyond the labels").

    .venv/bin/python bench/teacher_probes/corrected_teacher.py outputs/dis/miniature_disentangled \
        outputs/corrected_teacher.tsv
"""
import argparse
from pathlib import Path

from reprolib.data import read_qrels, read_scores, write_scores
from reprolib.search import mean_margin


def corrected(teacher, qrels):
    """(scores, queries corrected): a copy of `teacher` with each mis-ranked positive raised above its best negative.
    Raising it also sharpens that query's target a little: the correction is not only of the ranking."""
    margin = mean_margin(teacher, qrels)
    scores, fixed = {}, 0
    for qid, hits in teacher.items():
        relevant = {pid for pid in hits if qrels.get(qid, {}).get(pid, 0) > 0}
        negatives = [score for pid, score in hits.items() if pid not in relevant]
        best = max(negatives, default=None)
        wrong = best is not None and any(hits[pid] <= best for pid in relevant)
        scores[qid] = {pid: best + margin if pid in relevant and score <= best else score
                       for pid, score in hits.items()} if wrong else dict(hits)
        fixed += wrong
    return scores, fixed


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
