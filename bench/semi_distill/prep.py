"""The synthetic data (2,000 dev queries) in ROOT/full, and ROOT/lab<share>: the same with the train labels
(and BM25 negatives) of only a seeded share of the training queries.   python prep.py ROOT 0.2"""
import random
import sys
from pathlib import Path

from reprolib.data.formats import read_negatives, read_qrels, write_negatives, write_qrels
from reprolib.data.prepare import prepare_synthetic

root, share = Path(sys.argv[1]), float(sys.argv[2])
full, lab = root / "full", root / f"lab{share}"
if not full.exists():
    prepare_synthetic(full, num_dev_queries=2000, progress=False)
lab.mkdir(parents=True, exist_ok=True)
for f in full.iterdir():   # everything but the labels is shared
    if f.name not in ("qrels.train.tsv", "train.negatives.tsv") and not (lab / f.name).exists():
        (lab / f.name).symlink_to(f.resolve())
qrels = read_qrels(full / "qrels.train.tsv")
keep = sorted(qrels)
random.Random(7).shuffle(keep)
keep = set(keep[:int(len(keep) * share)])
write_qrels(lab / "qrels.train.tsv", {q: r for q, r in qrels.items() if q in keep})
negatives = read_negatives(full / "train.negatives.tsv")
write_negatives(lab / "train.negatives.tsv", {q: n for q, n in negatives.items() if q in keep})
print(len(qrels), "train queries,", len(keep), "labelled")
