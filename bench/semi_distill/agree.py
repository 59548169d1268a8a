"""How much of the teacher the student's start (the teacher's stage 1) already knows, on the first 1,000
unlabelled training queries: the share of (teacher's top passage, other passage) pairs among the teacher's
top 20 that stage 1 orders as the teacher does, and how often stage 1's first of them is the teacher's.
python agree.py ROOT 0.2"""
import sys
from pathlib import Path

import numpy as np

from reprolib.data import Corpus
from reprolib.data.formats import read_qrels, read_queries, read_scores
from reprolib.modeling import load_encoder

root, share = Path(sys.argv[1]), float(sys.argv[2])
labelled = read_qrels(root / f"lab{share}" / "qrels.train.tsv")
scores = read_scores(root / "semi_teacher" / "teacher" / "teacher_scores.tsv")
queries = read_queries(root / "full" / "train.query.txt")
corpus = Corpus.open(root / "full", progress=False)
model = load_encoder(root / "semi_teacher" / "finetune" / "model")
unlabelled = [q for q in scores if q not in labelled][:1000]
agree, top = [], []
for qid, q in zip(unlabelled, model.encode_queries([queries[q] for q in unlabelled])):
    positions = corpus.positions(sorted(scores[qid], key=scores[qid].get, reverse=True))
    p = model.encode_passages([f"{corpus.title(i)} {corpus.text(i)}".strip() for i in positions])
    s = p @ q
    agree.append(np.mean(s[0] > s[1:]))
    top.append(s.argmax() == 0)
print("unlabelled: pair agreement", np.mean(agree), "top-1 agreement over the top 20", np.mean(top))
