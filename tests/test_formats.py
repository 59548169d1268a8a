"""Readers and writers of queries, qrels, negatives and runs; errors are exactly `path:line: problem`."""
import gzip

import pytest

from reprolib.data.formats import (iter_run, read_hits, read_negatives, read_qrels, read_queries, read_run, write_negatives,
                                   write_qrels, write_queries, write_run)
from reprolib.errors import DataError, ReprolibError


def write_bytes(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def raises_exactly(func, path, message):
    """Call func(path); it must raise DataError whose str is exactly f'{path}:{message}'."""
    with pytest.raises(DataError) as info:
        func(path)
    assert str(info.value) == f"{path}:{message}"
    assert isinstance(info.value, ReprolibError)
    return info.value


# ---------------------------------------------------------------- queries

def test_queries_tsv(tmp_path):
    path = write_bytes(tmp_path / "q.tsv", "1\twhat is a cat\n2\thow tall is Zürich's tower\n\n")
    assert read_queries(path) == {"1": "what is a cat", "2": "how tall is Zürich's tower"}


def test_queries_tsv_crlf(tmp_path):
    path = write_bytes(tmp_path / "q.tsv", "1\tfirst\r\n2\tsecond\r\n")
    assert read_queries(path) == {"1": "first", "2": "second"}


def test_queries_beir_jsonl(tmp_path):
    path = write_bytes(tmp_path / "queries.jsonl",
                       '{"_id": "q1", "text": "caf\\u00e9 prices", "metadata": {}}\n'
                       '{"_id": 7, "text": "numeric id"}\n')
    assert read_queries(path) == {"q1": "café prices", "7": "numeric id"}


def test_queries_gz(tmp_path):
    path = tmp_path / "queries.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"_id": "a", "text": "zipped"}\n')
    assert read_queries(path) == {"a": "zipped"}


def test_queries_round_trip(tmp_path):
    queries = {"1": "alpha beta", "q-2": "naïve — “quotes”", "3": "x"}
    write_queries(tmp_path / "q.tsv", queries)
    assert read_queries(tmp_path / "q.tsv") == queries
    write_queries(tmp_path / "q.tsv", {"1": "a\ttab, a\nbreak\r\nand more"})   # BEIR's texts carry some
    assert read_queries(tmp_path / "q.tsv") == {"1": "a tab, a break  and more"}
    with pytest.raises(DataError, match="query id 'q 1' contains whitespace"):
        write_queries(tmp_path / "q.tsv", {"q 1": "text"})
    assert read_queries(tmp_path / "q.tsv") == {"1": "a tab, a break  and more"}


def test_duplicate_query_id(tmp_path):
    path = write_bytes(tmp_path / "q.tsv", "1\ta\n2\tb\n1\tc\n")
    raises_exactly(read_queries, path, "3: duplicate query id '1'")


def test_empty_query_text(tmp_path):
    path = write_bytes(tmp_path / "q.tsv", "1\ta\n2\t   \n")
    raises_exactly(read_queries, path, "2: empty query text for '2'")


def test_empty_query_text_jsonl(tmp_path):
    path = write_bytes(tmp_path / "q.jsonl", '{"_id": "a", "text": "ok"}\n{"_id": "b", "text": ""}\n')
    raises_exactly(read_queries, path, "2: empty query text for 'b'")


def test_query_line_without_tab(tmp_path):
    path = write_bytes(tmp_path / "q.tsv", "1\ta\n2 no tab here\n")
    raises_exactly(read_queries, path, "2: expected 2 fields, found 1: '2 no tab here'")


def test_bad_json(tmp_path):
    path = write_bytes(tmp_path / "q.jsonl", '{"_id": "a", "text": "ok"}\n{"_id": "b", "text": \n')
    err = raises_exactly(read_queries, path, "2: invalid JSON (Expecting value)")
    assert err.line == 2


def test_json_not_an_object(tmp_path):
    path = write_bytes(tmp_path / "q.jsonl", '["a", "b"]\n')
    raises_exactly(read_queries, path, "1: expected a JSON object")


def test_json_missing_field(tmp_path):
    path = write_bytes(tmp_path / "q.jsonl", '{"_id": "a"}\n')
    raises_exactly(read_queries, path, "1: missing field 'text'")


def test_non_utf8_byte_names_line_and_byte(tmp_path):
    path = write_bytes(tmp_path / "q.tsv", b"1\tok\n2\tcaf\xe9 au lait\n")
    raises_exactly(read_queries, path, "2: not valid UTF-8 (byte 0xe9 at column 6)")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.tsv"
    for reader in (read_queries, read_qrels, read_negatives, read_run):
        with pytest.raises(DataError) as info:
            reader(path)
        assert str(info.value) == f"{path}: file not found"


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DataError) as info:
        read_queries(tmp_path)
    assert str(info.value) == f"{tmp_path}: is a directory, expected a file"


# ---------------------------------------------------------------- qrels

def test_qrels_trec_space(tmp_path):
    path = write_bytes(tmp_path / "qrels.txt", "1 0 10 1\n1 0 11 2\n2 0 10 0\n")
    assert read_qrels(path) == {"1": {"10": 1, "11": 2}, "2": {"10": 0}}


def test_qrels_trec_tab(tmp_path):
    path = write_bytes(tmp_path / "qrels.tsv", "1\t0\t10\t1\n2\tQ0\t20\t3\n")
    assert read_qrels(path) == {"1": {"10": 1}, "2": {"20": 3}}


def test_qrels_two_columns(tmp_path):
    path = write_bytes(tmp_path / "qrels.tsv", "1\t10\n1\t11\n2\t20\n")
    assert read_qrels(path) == {"1": {"10": 1, "11": 1}, "2": {"20": 1}}


def test_qrels_beir_header_crlf(tmp_path):
    path = write_bytes(tmp_path / "test.tsv", "query-id\tcorpus-id\tscore\r\nq1\tdoc1\t1\r\nq1\tdoc2\t2\r\nq2\tdoc1\t1\r\n")
    assert read_qrels(path) == {"q1": {"doc1": 1, "doc2": 2}, "q2": {"doc1": 1}}


def test_qrels_lotte_qas_jsonl(tmp_path):
    path = write_bytes(tmp_path / "qas.search.jsonl",
                       '{"qid": 0, "query": "q zero", "answer_pids": [5, 9]}\n{"qid": 1, "query": "q one", "answer_pids": [3]}\n')
    assert read_qrels(path) == {"0": {"5": 1, "9": 1}, "1": {"3": 1}}


@pytest.mark.parametrize("line, problem", [
    ('{"qid": 1, "answer_pids": 5}', "2: answer_pids must be a list of ids, got 5"),
    ('{"qid": null, "answer_pids": [5]}', "2: qid must be a string or an integer, got null"),
    ('{"qid": "q 1", "answer_pids": [5]}', "2: qid 'q 1' contains whitespace, which TREC runs and qrels cannot carry"),
    ('{"qid": 1, "answer_pids": [[5]]}', "2: answer pid must be a string or an integer, got [5]"),
])
def test_qrels_lotte_qas_jsonl_bad_records(tmp_path, line, problem):
    path = write_bytes(tmp_path / "qas.jsonl", '{"qid": 0, "answer_pids": [3]}\n' + line + "\n")
    raises_exactly(read_qrels, path, problem)
    raises_exactly(read_qrels, write_bytes(tmp_path / "empty.jsonl", ""), " no judgements: the qrels file is empty")



def test_qrels_round_trip(tmp_path):
    qrels = {"1": {"10": 1, "11": 0}, "q2": {"d-3": 3}}
    write_qrels(tmp_path / "qrels.tsv", qrels)
    assert read_qrels(tmp_path / "qrels.tsv") == qrels
    assert (tmp_path / "qrels.tsv").read_text().splitlines()[0] == "1\t0\t10\t1"


@pytest.mark.parametrize("header", ["query-id\tcorpus-id\tscore", "qid\tpid\trel"])
def test_a_qrels_file_with_a_header_is_rewritten_with_one(tmp_path, header):
    from reprolib.data.formats import rewrite_qrels

    path = write_bytes(tmp_path / "qrels.tsv", f"{header}\n1\t10\t1\n1\t11\t1\n2\t12\t1\n")
    rewrite_qrels(path, {"1": {"10": 1}})
    assert path.read_text().splitlines() == ["query-id\tcorpus-id\tscore", "1\t10\t1"]


def test_qrels_truncated_line(tmp_path):
    path = write_bytes(tmp_path / "qrels.tsv", "1 0 10 1\n1 0 11 1\n2 0\n")
    raises_exactly(read_qrels, path, "3: expected 4 fields, found 2: '2 0'")


def test_qrels_non_integer_relevance(tmp_path):
    path = write_bytes(tmp_path / "qrels.tsv", "1 0 10 1\n1 0 11 high\n")
    raises_exactly(read_qrels, path, "2: relevance 'high' is not an integer")


def test_qrels_duplicate_row(tmp_path):
    path = write_bytes(tmp_path / "qrels.tsv", "1 0 10 1\n2 0 10 1\n1 0 10 1\n")
    raises_exactly(read_qrels, path, "3: duplicate judgement for query '1', doc '10'")


def test_qrels_lotte_duplicate_query(tmp_path):
    path = write_bytes(tmp_path / "qas.dev.jsonl", '{"qid": 1, "answer_pids": [1]}\n{"qid": 1, "answer_pids": [2]}\n')
    raises_exactly(read_qrels, path, "2: duplicate query id '1'")


def test_qrels_non_utf8(tmp_path):
    path = write_bytes(tmp_path / "qrels.tsv", b"1 0 10 1\n1 0 \xff1 1\n")
    raises_exactly(read_qrels, path, "2: not valid UTF-8 (byte 0xff at column 5)")


# ---------------------------------------------------------------- negatives

def test_negatives_read(tmp_path):
    path = write_bytes(tmp_path / "neg.tsv", "1\t5,3,9\n2\t7\n")
    negatives = read_negatives(path)
    assert negatives == {"1": ["5", "3", "9"], "2": ["7"]}
    assert list(negatives["1"]) == ["5", "3", "9"]  # file (rank) order kept


def test_negatives_round_trip_skips_empty(tmp_path):
    write_negatives(tmp_path / "neg.tsv", {"1": ["b", "a"], "2": [], "3": ["c"]})
    assert read_negatives(tmp_path / "neg.tsv") == {"1": ["b", "a"], "3": ["c"]}


def test_negatives_empty_list(tmp_path):
    path = write_bytes(tmp_path / "neg.tsv", "1\t5\n2\t,\n")
    raises_exactly(read_negatives, path, "2: no negatives listed for query '2'")


def test_negatives_duplicate_query(tmp_path):
    path = write_bytes(tmp_path / "neg.tsv", "1\t5\n1\t6\n")
    raises_exactly(read_negatives, path, "2: duplicate query id '1'")


# ---------------------------------------------------------------- runs

def test_run_read(tmp_path):
    path = write_bytes(tmp_path / "run.trec", "1 Q0 10 1 2.5 bm25\n1 Q0 11 2 1.0 bm25\n2\tQ0\t10\t1\t-0.5\tx\n")
    assert read_run(path) == {"1": {"10": 2.5, "11": 1.0}, "2": {"10": -0.5}}


def test_hits_read_from_a_run_or_a_teacher_scores_file(tmp_path):
    """A cross-encoder's scored training pairs fuse like a run (notebook 41)."""
    run = write_bytes(tmp_path / "run.trec", "1 Q0 10 1 2.5 ce\n1 Q0 11 2 1.0 ce\n")
    scores = write_bytes(tmp_path / "teacher_scores.tsv", "1\t10\t2.5\n1\t11\t1\n")
    assert read_hits(run) == read_hits(scores) == {"1": {"10": 2.5, "11": 1.0}}
    assert read_hits([run]) == read_run(run)
    commented = write_bytes(tmp_path / "commented.trec", "# bm25 run\n1 Q0 10 1 2.5 ce\n")
    assert read_hits(commented) == {"1": {"10": 2.5}}
    commented = write_bytes(tmp_path / "commented.tsv", "# teacher scores\n1\t10\t2.5\n")
    assert read_hits(commented) == {"1": {"10": 2.5}}
    bad = write_bytes(tmp_path / "bad.tsv", "1\t10\t2.5\n1 Q0 11 2 1.0 ce\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: expected 3 fields"):
        read_hits(bad)


def test_run_read_folds(tmp_path):
    """Runs of disjoint queries read as one (a cross-fitted teacher's folds); a shared query is an error."""
    first = write_bytes(tmp_path / "f0.trec", "1 Q0 10 1 2.5 a\n")
    second = write_bytes(tmp_path / "f1.trec", "2 Q0 11 1 1.5 b\n2 Q0 10 2 0.5 b\n")
    assert read_run([first, second]) == {"1": {"10": 2.5}, "2": {"11": 1.5, "10": 0.5}}
    again = write_bytes(tmp_path / "again.trec", "1 Q0 12 1 0.1 c\n")
    with pytest.raises(DataError, match=r"again.trec: query '1' is also in .*f0.trec: the runs must not share"):
        read_run([first, again])
    with pytest.raises(ReprolibError, match="read_run: no run files given"):
        read_run([])
    with pytest.raises(ReprolibError, match="a run file is listed twice"):
        read_run([str(first), first])


def test_run_read_query_by_query(tmp_path):
    path = write_bytes(tmp_path / "run.trec", "# a comment\n1 Q0 10 1 2.5 bm25\n1 Q0 11 2 1.0 bm25\n2\tQ0\t10\t1\t-0.5\tx\n")
    assert list(iter_run(path)) == list(read_run(path).items())
    regrouped = write_bytes(tmp_path / "mixed.trec", "1 Q0 10 1 2.5 t\n2 Q0 10 1 2.0 t\n1 Q0 11 2 1.0 t\n")
    raises_exactly(lambda p: list(iter_run(p)), regrouped,
                   "3: query '1' appears again after other queries; a file read query by query must list each "
                   "query's lines together (sort -s -k1,1 groups them)")
    with pytest.raises(DataError, match="no hits: the run file is empty"):
        list(iter_run(write_bytes(tmp_path / "empty.trec", "# nothing\n")))


def test_run_round_trip_sorted(tmp_path):
    run = {"1": {"a": 0.5, "b": 2.0, "c": 1.25}, "2": {"z": 3.0}}
    write_run(tmp_path / "run.trec", run, tag="t")
    lines = (tmp_path / "run.trec").read_text().splitlines()
    assert lines[:3] == ["1 Q0 b 1 2.000000 t", "1 Q0 c 2 1.250000 t", "1 Q0 a 3 0.500000 t"]
    assert read_run(tmp_path / "run.trec") == run


def test_run_non_numeric_score(tmp_path):
    path = write_bytes(tmp_path / "run.trec", "1 Q0 10 1 2.5 t\n1 Q0 11 2 high t\n")
    raises_exactly(read_run, path, "2: score 'high' is not a number")


def test_run_wrong_field_count(tmp_path):
    path = write_bytes(tmp_path / "run.trec", "1 Q0 10 1 2.5 t\n1 Q0 11 2 2.0\n")
    with pytest.raises(DataError) as info:
        read_run(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: expected 6 fields") and message.endswith("found 5: '1 Q0 11 2 2.0'")


def test_run_duplicate_hit(tmp_path):
    path = write_bytes(tmp_path / "run.trec", "1 Q0 10 1 2.5 t\n1 Q0 10 2 2.0 t\n")
    raises_exactly(read_run, path, "2: duplicate hit for query '1', doc '10'")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "q.tsv"
    write_queries(path, {"1": "old"})

    class Boom(dict):
        def items(self):
            yield "1", "new"
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_queries(path, Boom())
    assert read_queries(path) == {"1": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["q.tsv"]


def test_atomic_write_of_the_same_bytes_leaves_the_file_as_it_was(tmp_path):
    """Notebook 00 or 50 rerun by hand to the same result: no new input for the trainings that read the files."""
    import os

    path = tmp_path / "q.tsv"
    write_queries(path, {"1": "old"})
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    write_queries(path, {"1": "old"})
    assert path.stat().st_mtime_ns == 1_000_000_000 and [p.name for p in tmp_path.iterdir()] == ["q.tsv"]
    write_queries(path, {"1": "new"})
    assert path.stat().st_mtime_ns != 1_000_000_000 and read_queries(path) == {"1": "new"}



def test_atomic_write_names_the_output_only_for_its_own_failures(tmp_path, monkeypatch):
    """A full disk is the output's problem; an input that fails while the block reads it is the caller's to name,
    and what it wrote is on disk (fsync) before the rename."""
    import errno
    import os

    from reprolib.fileio import atomic_write

    path = tmp_path / "out.tsv"
    for error, blamed in [(OSError(errno.ENOSPC, "No space left on device"), True),
                          (OSError(errno.EIO, "Input/output error"), False), (gzip.BadGzipFile("bad input"), False)]:
        with pytest.raises((OSError, DataError)) as info:
            with atomic_write(path) as f:
                f.write("x")
                raise error
        assert (isinstance(info.value, DataError) and "cannot write here" in str(info.value)) == blamed, error
        assert list(tmp_path.iterdir()) == []
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_size))
    with atomic_write(path) as f:
        f.write("written")
    assert synced == [7] and path.read_text() == "written"
    with atomic_write(path) as f:   # a block may close the file itself
        f.write("closed")
        f.close()
    assert synced == [7] and path.read_text() == "closed"

    def delayed_write_error(fd):   # NFS, a failing disk: the write's error arrives with the sync
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", delayed_write_error)
    with pytest.raises(DataError, match="cannot write here"):
        with atomic_write(path) as f:
            f.write("lost")
    assert path.read_text() == "closed" and len(list(tmp_path.iterdir())) == 1


def test_atomic_write_over_a_file_it_cannot_read_replaces_it(tmp_path, monkeypatch):
    import filecmp

    path = tmp_path / "q.tsv"
    write_queries(path, {"1": "old"})

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(filecmp, "cmp", unreadable)   # a write-only old file: comparing it fails, writing does not
    write_queries(path, {"1": "new"})
    assert read_queries(path) == {"1": "new"}


def test_run_comments_and_extra_fields_ignored(tmp_path):
    path = write_bytes(tmp_path / "run.trec", "# a comment\n1 Q0 10 1 2.5 t extra\n")
    assert read_run(path) == {"1": {"10": 2.5}}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_scores_pickle_read_query_by_query_equals_pickle_load(tmp_path, protocol):
    import pickle

    from reprolib.data.formats import iter_scores_pickle, load_scores_pickle

    table = {q: {(q * 7919 + i * 104729) % 9_000_000: (i - 150) / 7 for i in range(300)} for q in range(1200)}
    table["text"] = {"x" * 300: 1.5, 300: -2.0, 70_000: 1e300, -5: 0.0, 2**40: 1.0, "é": 2.0}
    table["long"] = {i * 65_537 % 2**31: i / 3 for i in range(2_500)}     # SETITEMS batches of 1000, frames between
    table["mixed"] = {i if i % 7 else -i: float(i) for i in range(1, 400)}
    path = tmp_path / "scores.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(table, f, protocol=protocol)
    assert list(iter_scores_pickle(path)) == list(table.items())
    from reprolib.data.formats import _PickledScores

    with gzip.open(path, "rb") as f:    # pickle memoizes every query's dict: none may be kept
        reader = _PickledScores(f)
        assert sum(1 for _ in reader.items()) == len(table)
        assert not any(isinstance(value, dict) and value for value in reader.memo.values())
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(pickle.dumps(table, protocol=protocol)[:-20])
    with pytest.raises(DataError, match="not a complete scores pickle"):
        list(iter_scores_pickle(cut))
    damaged = tmp_path / "damaged.pkl.gz"   # the first deflate block's header flipped: zlib.error
    data = bytearray(gzip.compress(pickle.dumps(table, protocol=protocol)))   # a 10-byte header, no file name
    data[10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(DataError, match="not a complete scores pickle"):
        list(iter_scores_pickle(damaged))
    with pytest.raises(DataError, match="not a scores pickle"):
        load_scores_pickle(damaged)


@pytest.mark.parametrize("protocol", [0, 1])
def test_an_old_protocol_scores_pickle_is_loaded_whole(tmp_path, protocol):
    """Protocols 0 and 1 (Python 2's) use opcodes the streaming reader does not read: the teacher table falls
    back to `pickle.load` instead of failing."""
    import pickle

    from reprolib.data import Corpus
    from reprolib.data.groups import teacher_table

    corpus = Corpus.open(write_bytes(tmp_path / "c.tsv", "".join(f"{i}\tt\tx\n" for i in range(10))), progress=False)
    path = tmp_path / "s.pkl"
    path.write_bytes(pickle.dumps({"q1": {3: 1.5, 7: 0.5}, "q2": {9: -1.0}}, protocol=protocol))
    table = teacher_table(path, corpus)
    assert {q: (p.tolist(), s.tolist()) for q, (p, s) in table.items()} == {"q1": ([3, 7], [1.5, 0.5]),
                                                                           "q2": ([9], [-1.0])}


def test_mine_negatives_reads_a_run_whose_queries_are_apart_whole(tmp_path, capsys):
    from reprolib.cli import main
    from reprolib.search import mine_negatives

    run = write_bytes(tmp_path / "run.trec", "1 Q0 a 1 3.0 t\n2 Q0 b 1 2.0 t\n1 Q0 c 2 1.0 t\n1 Q0 d 3 0.5 t\n")
    qrels = write_bytes(tmp_path / "qrels.tsv", "1 0 c 1\n2 0 x 1\n")
    assert main(["mine-negatives", "--run", str(run), "--qrels", str(qrels), "--out", str(tmp_path / "n.tsv")]) == 0
    assert read_negatives(tmp_path / "n.tsv") == mine_negatives(read_run(run), read_qrels(qrels)) == \
        {"1": ["a", "d"], "2": ["b"]}
    assert capsys.readouterr().out.strip().startswith("wrote negatives for 2 queries")


def test_a_pickled_score_that_is_not_a_number_is_named(tmp_path):
    import pickle

    from reprolib.data.formats import read_scores

    path = tmp_path / "s.pkl"
    path.write_bytes(pickle.dumps({"q1": {3: 1.5, 7: "high"}}))
    with pytest.raises(DataError, match=r"s.pkl: a score that is not a number"):
        read_scores(path)
