"""ROOT/pseudo<share>: the labelled share's qrels plus, for every unlabelled training query, the teacher's top
passage as its positive; prints how often that passage is the true answer.   python pseudo.py ROOT 0.2"""
import sys
from pathlib import Path

from reprolib.data.formats import read_qrels, read_scores, write_qrels

root, share = Path(sys.argv[1]), float(sys.argv[2])
lab, out = root / f"lab{share}", root / f"pseudo{share}"
out.mkdir(exist_ok=True)
for f in lab.iterdir():
    if f.name not in ("qrels.train.tsv", "train.negatives.tsv") and not (out / f.name).exists():
        (out / f.name).symlink_to(f.resolve())
qrels = read_qrels(lab / "qrels.train.tsv")
scores = read_scores(root / "semi_teacher" / "teacher" / "teacher_scores.tsv")
truth = read_qrels(root / "full" / "qrels.train.tsv")
pseudo, right = dict(qrels), 0
for qid, hits in scores.items():
    if qid not in qrels:
        top = max(hits, key=hits.get)
        pseudo[qid] = {top: 1}
        right += truth[qid].get(top, 0) > 0
write_qrels(out / "qrels.train.tsv", pseudo)
n = len(pseudo) - len(qrels)
print(f"{len(qrels)} labelled + {n} pseudo-labelled; teacher top-1 right on {right}/{n} = {right / max(n, 1):.3f}")
