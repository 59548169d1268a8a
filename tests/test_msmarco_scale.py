"""The synthetic dataset at MS MARCO's sizes (reprolib.data.msmarco_scale), here at 1/1000 of them: the same
files and proportions, each readable by the reader a recipe uses, and the same bytes for the same seed."""
import hashlib
import pickle

import numpy as np
import pytest

from reprolib.data import msmarco_scale
from reprolib.data.formats import (iter_scores_pickle, read_negatives, read_qrels, read_queries, read_run,
                                   read_scores)
from reprolib.data.validate import validate_dataset
from reprolib.errors import ReprolibError

SCALE = 0.001


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("msmarco_scale")
    return out, msmarco_scale.generate(out, scale=SCALE, progress=False)


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "msmarco_scale.json"}


def test_counts_are_msmarco_s_in_proportion(data):
    out, stats = data
    assert msmarco_scale.counts(1.0) == {"passages": 8_841_823, "train_queries": 502_939, "train_qrels_rows": 532_761,
                                         "dev_queries": 6_980, "dev_qrels_rows": 7_437, "negatives_lines": 400_782}
    assert sum(1 for _ in open(out / "corpus.tsv")) == stats["passages"] == 8842
    qrels = {split: read_qrels(out / f"qrels.{split}.tsv") for split in ("train", "dev")}
    assert len(read_queries(out / "train.query.txt")) == len(qrels["train"]) == 503
    assert sum(len(q) for q in qrels["train"].values()) == 533            # 30 queries with a second passage
    assert sum(1 for _ in open(out / "train.negatives.tsv")) == 401
    run = read_run(out / "train.mined.trec")
    assert len(run) == 503 and {len(hits) for hits in run.values()} == {200}
    assert stats["teacher_scores"] == 503 * 318


def test_the_dataset_validates(data):
    out, _ = data   # validate_dataset raises on the first fault
    assert list(validate_dataset(out))[-1] == "train: negatives for 401 queries"


def test_negatives_never_list_a_positive_nor_a_passage_twice(data):
    out, _ = data
    qrels = read_qrels(out / "qrels.train.tsv")
    scored = read_scores(out / "hard-negatives/train.ce_scores.tsv")
    for name, depth in (("train.negatives.tsv", 200), ("hard-negatives/train.negatives.union.tsv", 317)):
        negatives = read_negatives(out / name)
        for qid, pids in negatives.items():
            assert len(pids) == len(set(pids)) and len(pids) in (depth, depth - 1) and not set(pids) & set(qrels[qid])
            assert all(0 <= int(p) < 8842 for p in pids)
    union = read_negatives(out / "hard-negatives/train.negatives.union.tsv")
    assert all(set(pids) == set(scored[qid]) - set(qrels[qid]) for qid, pids in union.items())
    first = next(iter(negatives.items()))   # the entity's family first: its pids are within 16 of the positive
    positive = int(next(iter(qrels[first[0]])))
    assert all(abs(int(p) - positive) < 16 for p in first[1][:3])


def test_the_pickle_and_the_text_hold_the_same_teacher_scores(data):
    out, _ = data
    text = read_scores(out / "hard-negatives/train.ce_scores.tsv")
    pickled = read_scores(out / "hard-negatives/train.ce_scores.pkl.gz")   # sentence-transformers' layout
    streamed = {str(q): {str(p): s for p, s in hits.items()}
                for q, hits in iter_scores_pickle(out / "hard-negatives/train.ce_scores.pkl.gz")}
    assert streamed == pickled
    assert pickled.keys() == text.keys() and len(pickled) == 503
    assert all(pickled[q] == pytest.approx(text[q], abs=1e-4) for q in text)
    import gzip

    with gzip.open(out / "hard-negatives/train.ce_scores.pkl.gz", "rb") as f:
        table = pickle.load(f)
    qid, hits = next(iter(table.items()))
    assert isinstance(qid, int) and all(isinstance(p, int) and isinstance(s, float) for p, s in hits.items())
    qrels = read_qrels(out / "qrels.train.tsv")
    best = [max(hits, key=hits.get) for hits in text.values()]   # the labelled passage is the teacher's favourite
    assert np.mean([pid in qrels[qid] for qid, pid in zip(text, best)]) > 0.95


def test_same_seed_same_bytes(data, tmp_path):
    out, _ = data
    msmarco_scale.generate(tmp_path, scale=SCALE, progress=False)
    assert digest(tmp_path) == digest(out)


def test_bad_scale(tmp_path):
    with pytest.raises(ReprolibError, match="scale must be in"):
        msmarco_scale.generate(tmp_path, scale=0)
