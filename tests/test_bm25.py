"""BM25 retrieval (checked against bm25s), run fusion, negative mining, and the scifact acceptance check through the CLI."""
import json

import ir_measures
import numpy as np
import pytest

from conftest import shared_dataset
from reprolib.cli import main
from reprolib.data import read_qrels, read_queries, read_run
from reprolib.data.corpus import Corpus
from reprolib.errors import ReprolibError
from reprolib.search import bm25_search, fuse_runs, label_scores, mine_negatives, pick_fusion_weight, top_hits


@pytest.fixture(scope="session")
def synthetic_dev_run(synthetic_dir, synthetic_corpus):
    queries = read_queries(synthetic_dir / "dev.query.txt")
    return bm25_search(synthetic_corpus, queries, topk=100, progress=False)


def test_bm25_beats_random_on_synthetic(synthetic_dir, synthetic_dev_run):
    qrels = read_qrels(synthetic_dir / "qrels.dev.tsv")
    assert set(synthetic_dev_run) == set(qrels)
    rr = ir_measures.calc_aggregate([ir_measures.RR @ 10], qrels, synthetic_dev_run)[ir_measures.RR @ 10]
    # one relevant passage in 2,000: random ranking gives RR@10 of about 0.0015
    assert rr > 0.4


def test_bm25_hits_sorted_and_positive(synthetic_dev_run, synthetic_corpus):
    for hits in synthetic_dev_run.values():
        scores = list(hits.values())
        assert scores == sorted(scores, reverse=True)
        assert all(s > 0 for s in scores)
        assert 0 < len(hits) <= 100
    pids = {pid for hits in synthetic_dev_run.values() for pid in hits}
    assert not synthetic_corpus.missing(pids)


@pytest.fixture
def toy_corpus(tmp_path):
    path = tmp_path / "corpus.tsv"
    path.write_text("a\tApples\tred apples and green apples\n"
                    "b\tPears\tpears are sweet\n"
                    "c\t\tapples grow on trees\n"
                    "d\t\tnothing relevant at all\n"
                    "e\tBananas\tyellow bananas\n")
    return Corpus.open(path, progress=False)


def test_zero_score_hits_are_dropped(toy_corpus):
    run = bm25_search(toy_corpus, {"q1": "apples", "q2": "kiwi unknownword", "q3": "sweet bananas"},
                      topk=10, progress=False)
    assert list(run["q1"]) == ["a", "c"]  # a mentions apples three times (title + text)
    assert run["q1"]["a"] > run["q1"]["c"] > 0
    assert run["q2"] == {}  # no term matches: no hits at all, rather than 5 zero-score ones
    assert set(run["q3"]) == {"b", "e"}


def test_topk_larger_than_corpus(toy_corpus):
    run = bm25_search(toy_corpus, {"q": "apples pears bananas trees nothing"}, topk=1000, progress=False)
    assert set(run["q"]) == {"a", "b", "c", "d", "e"}


def test_batches_give_the_same_run(toy_corpus):
    queries = {str(i): text for i, text in enumerate(["apples", "pears", "bananas", "trees", "sweet"])}
    whole = bm25_search(toy_corpus, queries, topk=3, progress=False)
    batched = bm25_search(toy_corpus, queries, topk=3, batch_size=2, progress=False)
    assert batched == whole



def _bm25s_reference(corpus, queries):
    """bm25s's own Lucene BM25 over the same passages and tokenizer: its scores of every passage per query."""
    import bm25s

    tokenizer = bm25s.tokenization.Tokenizer(stopwords="en", stemmer=None)
    passages = [f"{corpus.title(i)} {corpus.text(i)}" for i in range(len(corpus))]
    model = bm25s.BM25(method="lucene")
    model.index((tokenizer.tokenize(passages, return_as="ids", show_progress=False), tokenizer.get_vocab_dict()),
                show_progress=False)
    ids = tokenizer.tokenize(list(queries.values()), update_vocab=False, return_as="ids", show_progress=False)
    return dict(zip(queries, (model.get_scores(list(map(int, q))) for q in ids)))


def test_bm25_scores_and_ranks_as_bm25s_does(synthetic_dir, synthetic_corpus, synthetic_dev_run, monkeypatch):
    """Our index (built in chunks of 7 passages here, to cross chunk edges) scores each hit as bm25s does,
    and no passage left out of a query's top 100 scores above its last hit."""
    import reprolib.bm25

    queries = dict(list(read_queries(synthetic_dir / "dev.query.txt").items())[:25])
    reference = _bm25s_reference(synthetic_corpus, queries)
    monkeypatch.setattr(reprolib.bm25, "CHUNK", 7)
    run = bm25_search(synthetic_corpus, queries, topk=100, progress=False)
    for qid, hits in run.items():
        assert hits == {p: synthetic_dev_run[qid][p] for p in hits}   # chunking changes nothing
        expected = reference[qid]
        positions = synthetic_corpus.positions(list(hits))
        assert list(hits.values()) == pytest.approx(expected[positions].tolist(), rel=1e-5)
        left_out = np.delete(expected, positions)
        assert left_out.max() <= min(hits.values()) * (1 + 1e-5)
        assert len(hits) == min(100, int((expected > 0).sum()))


def test_fused_runs_interpolate_standardized_scores_over_the_union_of_hits():
    first = {"q": {"a": 3.0, "b": 1.0}, "only_first": {"x": 2.0, "y": 2.0}}
    second = {"q": {"b": 10.0, "c": 0.0}}
    # z over each run's hits: first a +1, b -1 (lowest -1); second b +1, c -1 (lowest -1)
    fused = fuse_runs(first, second, 0.25)
    assert fused["q"] == pytest.approx({"a": 0.75 - 0.25, "b": -0.75 + 0.25, "c": -0.75 - 0.25})
    assert fused["only_first"] == {"x": 0.0, "y": 0.0}      # tied scores: sd taken as 1, no NaN
    assert set(fused) == set(first)
    assert fuse_runs(first, second, 0.0)["q"]["a"] > fuse_runs(first, second, 0.0)["q"]["b"]   # first's order
    assert fuse_runs(first, second, 1.0)["q"]["b"] > fuse_runs(first, second, 1.0)["q"]["c"]   # second's order
    # a query the second run lacks keeps the first's ranking at any weight
    assert fuse_runs({"solo": {"x": 3.0, "y": 1.0}}, second, 1.0)["solo"] == pytest.approx({"x": 1.0, "y": -1.0})
    # and a query the first run found nothing for (BM25, a query of stopwords) takes the second's, at any weight
    assert fuse_runs({"q": {}}, second, 0.0)["q"] == pytest.approx({"b": 1.0, "c": -1.0})
    assert fuse_runs({"none": {}}, second, 0.5) == {"none": {}}


def test_the_fusion_weight_is_the_one_that_ranks_the_judged_queries_best():
    # The runs rank each query's hits in opposite orders: b passes a in q1 above weight 0.5, and x falls from
    # first to last in q2 (y stays second).
    first = {"q1": {"a": 3.0, "b": 2.0, "c": 1.0}, "q2": {"x": 3.0, "y": 2.0, "z": 1.0}}
    second = {"q1": {"b": 3.0, "a": 2.0, "c": 1.0}, "q2": {"z": 3.0, "y": 2.0, "x": 1.0}}
    qrels = {"q1": {"b": 1}, "q2": {"x": 1}}
    weight, by_weight = pick_fusion_weight(first, second, qrels, [0.8, 0.2, 0.0])
    assert by_weight == pytest.approx({0.0: 0.75, 0.2: 0.75, 0.8: 2 / 3}) and weight == 0.0   # a tie: the smaller
    qrels = {"q1": {"b": 1}, "q2": {"y": 1}}    # y is second in both runs whatever the weight; b rises with it
    weight, by_weight = pick_fusion_weight(first, second, qrels, [0.0, 0.2, 0.8])
    assert weight == 0.8 and by_weight[0.8] == 0.75 and by_weight[0.0] == 0.5


def test_top_hits_keep_the_best_then_any_lower_ranked_positive():
    run = {"q1": {"p1": 1.0, "p2": 5.0, "p3": 3.0, "p4": 4.0}, "q2": {"x": 2.0}}
    top = top_hits(run, 2, keep={"q1": {"p1": 1, "p3": 0}})
    assert list(top["q1"]) == ["p2", "p4", "p1"] and top["q1"]["p1"] == 1.0   # p3 judged 0: not kept
    assert top["q2"] == {"x": 2.0}
    assert list(top_hits(run, 2)["q1"]) == ["p2", "p4"]


def test_label_scores_put_each_positive_at_the_teachers_mean_margin():
    teacher = {"q1": {"p2": 1.0, "p1": 3.0, "p3": 2.0}, "q2": {"x": 0.5, "y": 1.5}}
    qrels = {"q1": {"p1": 1, "p3": 0}, "q2": {"x": 1}}
    # margins: q1 3-1, 3-2; q2 0.5-1.5 (the teacher ranks the positive second there): mean (2 + 1 - 1) / 3
    scores = label_scores(teacher, qrels)
    assert scores == {"q1": {"p1": pytest.approx(2 / 3), "p2": 0.0, "p3": 0.0},
                      "q2": {"x": pytest.approx(2 / 3), "y": 0.0}}
    assert list(scores["q1"]) == ["p2", "p1", "p3"]   # the teacher's order: notebook 70 takes negatives in it
    with pytest.raises(ReprolibError, match="no query has both"):
        label_scores({"q": {"p": 1.0}}, {"q": {"p": 1}})
    with pytest.raises(ReprolibError, match="mean margin -1"):
        label_scores({"q": {"p": 1.0, "n": 2.0}}, {"q": {"p": 1}})


# ---------------------------------------------------------------- mine_negatives

RUN = {"q1": {"p1": 9.0, "p2": 8.0, "p3": 7.0, "p4": 6.0, "p5": 5.0, "p6": 4.0},
       "q2": {"x": 1.0, "y": 2.0, "z": 3.0},
       "q3": {"only": 1.0}}
QRELS = {"q1": {"p2": 1, "p4": 2, "p5": 0}, "q3": {"only": 1}}


def test_mine_negatives_removes_positives_in_rank_order():
    negatives = mine_negatives(RUN, QRELS)
    assert negatives["q1"] == ["p1", "p3", "p5", "p6"]  # p5 is judged non-relevant: a valid negative
    assert negatives["q2"] == ["z", "y", "x"]  # ranked by score, not by dict order; no qrels: all kept
    assert "q3" not in negatives  # every hit is positive: no entry


def test_mine_negatives_depth_and_num():
    assert mine_negatives(RUN, QRELS, depth=3)["q1"] == ["p1", "p3"]  # depth counts hits before removal
    assert mine_negatives(RUN, QRELS, depth=200, num=2)["q1"] == ["p1", "p3"]
    assert mine_negatives(RUN, QRELS, depth=5, num=10)["q1"] == ["p1", "p3", "p5"]
    assert mine_negatives(RUN, QRELS, depth=1, num=1) == {"q1": ["p1"], "q2": ["z"]}


def test_mine_negatives_on_synthetic(synthetic_dir, synthetic_dev_run):
    qrels = read_qrels(synthetic_dir / "qrels.dev.tsv")
    negatives = mine_negatives(synthetic_dev_run, qrels, depth=50, num=30)
    for qid, pids in negatives.items():
        assert len(pids) <= 30
        assert not set(pids) & set(qrels[qid])
        ranked = list(synthetic_dev_run[qid])[:50]
        assert pids == [p for p in ranked if p not in qrels[qid]][:30]


# ---------------------------------------------------------------- acceptance

def test_scifact_bm25_ndcg10_through_the_cli(tmp_path, capsys):
    scifact = shared_dataset("beir", "scifact")
    if not (scifact / "corpus.jsonl").exists() or not (scifact / "qrels" / "test.tsv").exists():
        pytest.skip("scifact corpus or test qrels absent")
    run = tmp_path / "scifact.bm25.trec"
    assert main(["bm25", "--corpus", str(scifact), "--queries", str(scifact), "--split", "test", "--out", str(run)]) == 0
    assert len(read_run(run)) == 300
    capsys.readouterr()
    assert main(["evaluate", str(run), str(scifact), "--split", "test", "--metrics", "nDCG@10", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["nDCG@10"] == pytest.approx(0.662, abs=0.01)
