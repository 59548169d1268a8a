"""sentence-transformers' MS MARCO hard negatives: the union and CE-margin recipes on hand-built records,
and `prepare("msmarco-hard-negatives")` against fixture files served from 127.0.0.1."""
import gzip
import json
import pickle

import numpy as np
import pytest
from test_download import marco_urls, server  # noqa: F401  (the local HTTP server and its MS MARCO files)

from reprolib.data import prepare_remote
from reprolib.data.formats import read_negatives, read_scores
from reprolib.data.layout import available_splits, find_corpus_file
from reprolib.data.prepare import prepare
from reprolib.data.sbert_negatives import ce_margin_negatives, union_negatives, write_union_negatives
from reprolib.errors import DataError, ReprolibError

# Query 1: positives score 9 and 8, so the threshold is 8 - 3 = 5.
SCORES = {
    1: {10: 9.0, 11: 8.0, 20: np.float32(5.0), 21: 5.01, 22: 1.0, 23: 0.0, 24: -1.0, 25: -2.0, 26: -3.0, 27: 6.0, 28: -4.0},
    3: {30: 1.0, 31: 0.0},
}
RECORDS = [
    {"qid": 1, "pos": [10, 11], "neg": {"bm25": [10, 20, 21, 22, 23, 24, 25, 26], "dense": [22, 26, 27, 28]}},
    {"qid": 2, "pos": [], "neg": {"bm25": [40, 41]}},  # no positives: left out by both recipes
    {"qid": 3, "pos": [30], "neg": {"bm25": [31]}},  # 31 scores above 1 - 3: no CE-margin line
]
# bm25: 10 is a positive; 20 sits on the threshold (kept); 21 is above it; 22..25 fill the cap of 5, so 26 waits.
# dense: 22 was taken already and does not count; 26 and 28 pass, 27 is above the threshold.
UNION = "1\t20,21,22,23,24,25,26,27,28\n3\t31\n"
CE_MARGIN = "1\t20,22,23,24,25,26,28\n"


def jsonl_gz(records):
    return gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())


@pytest.fixture
def urls(server):  # noqa: F811
    server.files["/negs.jsonl.gz"] = jsonl_gz(RECORDS)
    server.files["/scores.pkl.gz"] = gzip.compress(pickle.dumps(SCORES))
    return {"negatives_url": server.url + "/negs.jsonl.gz", "scores_url": server.url + "/scores.pkl.gz", "progress": False}


# --- the recipes, per query ------------------------------------------------------------------------
def test_union_is_every_system_minus_positives_in_first_seen_order():
    systems = {"bm25": [5, 1, 7], "tas-b": [7, 2, 9, 1], "v3": [3]}
    assert union_negatives([9], systems) == [5, 1, 7, 2, 3]
    assert union_negatives([], systems) == []


def test_ce_margin_keeps_scores_at_or_below_the_threshold_up_to_the_cap_per_system():
    score = SCORES[1].__getitem__
    record = RECORDS[0]
    assert ce_margin_negatives(record["pos"], record["neg"], score) == [20, 22, 23, 24, 25, 26, 28]
    # the cap applies to each system separately; dense's 22, taken by bm25, does not use up a place
    assert ce_margin_negatives(record["pos"], record["neg"], score, per_system=2) == [20, 22, 26, 28]
    # the threshold follows the weakest positive: with 10 alone it is 9 - 3 = 6, and 21 (5.01) passes
    assert ce_margin_negatives([10], record["neg"], score, per_system=2) == [20, 21, 22, 26]
    assert ce_margin_negatives([11], {"a": [20, 21, 22]}, score, margin=4) == [22]  # threshold 4
    assert ce_margin_negatives([], record["neg"], score) == []


# --- prepare --------------------------------------------------------------------------------------
def test_prepare_writes_both_recipes_and_keeps_the_scores(server, urls, tmp_path):  # noqa: F811
    out = tmp_path / "hardnegs"
    prepare("msmarco-hard-negatives", out, **urls)  # the notebooks' entry point
    assert (out / "train.negatives.union.tsv").read_text() == UNION
    assert (out / "train.negatives.ce_margin.tsv").read_text() == CE_MARGIN
    assert read_negatives(out / "train.negatives.ce_margin.tsv") == {"1": ["20", "22", "23", "24", "25", "26", "28"]}
    assert (out / "train.ce_scores.pkl.gz").read_bytes() == server.files["/scores.pkl.gz"]
    assert read_scores(out / "train.ce_scores.pkl.gz")["1"]["20"] == 5.0
    marker = json.loads((out / "prepared.json").read_text())
    assert marker["dataset"] == "msmarco-hard-negatives"
    assert marker["lines"] == {"train.negatives.union.tsv": 2, "train.negatives.ce_margin.tsv": 1}
    # negatives only: nothing here looks like a dataset to the layout readers
    assert available_splits(out) == []
    with pytest.raises(DataError, match="no corpus file"):
        find_corpus_file(out)

    # a second call is a no-op: no request, no file rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    requests = len(server.requests)
    prepare_remote.prepare("msmarco-hard-negatives", out, **urls)
    assert len(server.requests) == requests == 2
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_prepare_resumes_from_the_files_it_already_has(server, urls, tmp_path):  # noqa: F811
    out = prepare_remote.prepare_msmarco_hard_negatives(tmp_path, **urls)
    (out / "prepared.json").unlink()
    (out / "train.negatives.ce_margin.tsv").unlink()
    kept = (out / "train.negatives.union.tsv").stat().st_mtime_ns
    requests = len(server.requests)
    prepare_remote.prepare_msmarco_hard_negatives(tmp_path, **urls)
    assert len(server.requests) == requests  # both downloads are reused
    assert (out / "train.negatives.ce_margin.tsv").read_text() == CE_MARGIN
    assert (out / "train.negatives.union.tsv").stat().st_mtime_ns == kept
    assert (out / "prepared.json").exists()


def test_a_bad_json_line_names_file_and_line_and_leaves_no_output(server, urls, tmp_path):  # noqa: F811
    lines = json.dumps(RECORDS[0]) + "\n" + '{"qid": 2, "pos": [' + "\n"
    server.files["/negs.jsonl.gz"] = gzip.compress(lines.encode())
    with pytest.raises(DataError, match=r"msmarco-hard-negatives\.jsonl\.gz:2: invalid JSON"):
        prepare_remote.prepare("msmarco-hard-negatives", tmp_path, **urls)
    assert not (tmp_path / "train.negatives.union.tsv").exists() and not (tmp_path / "prepared.json").exists()


@pytest.mark.parametrize("line, problem", [
    ('[1, 2]', "expected a JSON object"),
    ('{"qid": 7, "pos": [1]}', "missing field 'neg'"),
    ('{"qid": "7", "pos": [1], "neg": {}}', "field 'qid' must be an integer"),
    ('{"qid": 7, "pos": ["1"], "neg": {}}', "field 'pos' must be a list of integer pids"),
    ('{"qid": 7, "pos": [1], "neg": {"bm25": 5}}', "field 'neg' must map system names to lists of integer pids"),
    (json.dumps(RECORDS[0]), "duplicate query id 1"),
])
def test_bad_records_name_file_and_line(tmp_path, line, problem):
    path = tmp_path / "negs.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(RECORDS[0]) + "\n" + line + "\n").encode()))
    with pytest.raises(DataError, match=rf"negs\.jsonl\.gz:2: {problem}"):
        write_union_negatives(path, tmp_path / "union.tsv")
    assert not (tmp_path / "union.tsv").exists()


def test_a_missing_teacher_score_names_the_query_line(server, urls, tmp_path):  # noqa: F811
    server.files["/scores.pkl.gz"] = gzip.compress(pickle.dumps({1: {10: 9.0}}))
    with pytest.raises(DataError, match=r"msmarco-hard-negatives\.jsonl\.gz:1: query 1, passage 11 has no score in train\.ce_scores\.pkl\.gz$"):
        prepare_remote.prepare_msmarco_hard_negatives(tmp_path, **urls)
    assert (tmp_path / "train.negatives.union.tsv").read_text() == UNION  # the union needs no scores: kept
    assert not (tmp_path / "train.negatives.ce_margin.tsv").exists()


def test_data_prepare_command_takes_both_urls_and_lists_the_name(urls, tmp_path):
    from reprolib.cli import main

    out = tmp_path / "hardnegs"
    assert main(["data", "prepare", "msmarco-hard-negatives", "--out", str(out),
                 "--url", f"negatives_url={urls['negatives_url']}", "--url", f"scores_url={urls['scores_url']}"]) == 0
    assert (out / "train.negatives.ce_margin.tsv").read_text() == CE_MARGIN
    with pytest.raises(ReprolibError, match="msmarco-hard-negatives, msmarco-passage\\+hard-negatives"):
        prepare_remote.prepare("msmarco-hard-negs", tmp_path / "other")


def test_msmarco_passage_plus_hard_negatives_is_one_data_stage(server, urls, marco_urls, tmp_path):  # noqa: F811
    out = prepare("msmarco-passage+hard-negatives", tmp_path / "marco", **{**marco_urls, **urls})
    assert find_corpus_file(out).name == "corpus.tsv" and "train" in available_splits(out)
    extra = out / "hard-negatives"
    assert read_negatives(extra / "train.negatives.union.tsv")
    assert read_scores(extra / "train.ce_scores.pkl.gz")
