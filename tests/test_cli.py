"""The `reprolib` command: exit codes, one-line errors naming file and line, the data verbs, encode and search."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from reprolib.cli import main
from reprolib.data import read_negatives, read_qrels, read_queries, read_run, write_qrels, write_run
from reprolib.data.corpus import Corpus


def error_line(capsys, argv):
    """Run the CLI; it must exit 2 with exactly one `error: ...` line, the last line of stderr, and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def ok(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.fixture
def tiny(tmp_path):
    """A 5-passage dataset in MS MARCO layout with a dev split."""
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "corpus.tsv").write_text("".join(f"{i}\tTitle {i}\tpassage number {i} about topic{i}\n" for i in range(10, 15)))
    (d / "dev.query.txt").write_text("1\ttopic10\n2\ttopic11\n3\ttopic12\n")
    (d / "qrels.dev.tsv").write_text("1 0 10 1\n2 0 11 1\n3 0 12 1\n")
    return d


@pytest.fixture
def synthetic_copy(synthetic_dir, tmp_path):
    """A private, writable copy of the session's synthetic dataset."""
    return shutil.copytree(synthetic_dir, tmp_path / "synthetic")


# ---------------------------------------------------------------- help

def test_python_m_reprolib_help():
    result = subprocess.run([sys.executable, "-m", "reprolib", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for verb in ("run", "status", "data", "bm25", "evaluate", "mine-negatives"):
        assert verb in result.stdout


def test_version(capsys):
    from reprolib import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"reprolib {__version__}"


def test_an_unknown_dataset_lists_every_kind_prepare_knows(capsys, tmp_path):
    assert error_line(capsys, ["data", "prepare", "msmacro", "--out", str(tmp_path / "d")]) == (
        "error: unknown dataset 'msmacro': expected synthetic, synthetic-msmarco, a dataset directory, msmarco-passage, "
        "msmarco-hard-negatives, msmarco-passage+hard-negatives, beir/<name> or lotte/<domain>/<split>")


def test_unknown_verb_exits_2(capsys):
    assert "invalid choice: 'no-such-verb'" in error_line(capsys, ["no-such-verb"])


# ---------------------------------------------------------------- evaluate

def test_evaluate_truncated_qrels_line(capsys, tmp_path):
    run = tmp_path / "run.trec"
    write_run(run, {"1": {"10": 2.0, "11": 1.0}})
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("1 0 10 1\n1 0 11 0\n2 0\n")
    assert error_line(capsys, ["evaluate", str(run), str(qrels)]) == f"error: {qrels}:3: expected 4 fields, found 2: '2 0'"


def test_evaluate_missing_run(capsys, tiny, tmp_path):
    run = tmp_path / "missing.trec"
    assert error_line(capsys, ["evaluate", str(run), str(tiny)]) == f"error: {run}: file not found"


def test_evaluate_missing_qrels(capsys, tmp_path):
    run = tmp_path / "run.trec"
    write_run(run, {"1": {"10": 2.0}})
    qrels = tmp_path / "nope"
    assert error_line(capsys, ["evaluate", str(run), str(qrels)]) == f"error: {qrels}: file or directory not found"


def test_evaluate_run_with_bad_score(capsys, tiny, tmp_path):
    run = tmp_path / "run.trec"
    run.write_text("1 Q0 10 1 1.5 t\n1 Q0 11 2 nan? t\n")
    assert error_line(capsys, ["evaluate", str(run), str(tiny)]) == f"error: {run}:2: score 'nan?' is not a number"


def test_evaluate_json(capsys, tiny, tmp_path):
    run = tmp_path / "run.trec"
    write_run(run, {"1": {"10": 2.0, "11": 1.0}, "2": {"10": 2.0, "11": 1.0}, "3": {"13": 1.0}})
    out = ok(capsys, ["evaluate", str(run), str(tiny), "--metrics", "RR@10 P@1", "--json"])
    result = json.loads(out)
    assert result == pytest.approx({"RR@10": (1 + 0.5 + 0) / 3, "P@1": 1 / 3})


# ---------------------------------------------------------------- bm25

def test_bm25_missing_corpus(capsys, tiny, tmp_path):
    corpus = tmp_path / "missing.tsv"
    line = error_line(capsys, ["bm25", "--corpus", str(corpus), "--queries", str(tiny), "--out", str(tmp_path / "r")])
    assert line == f"error: {corpus}: file or directory not found"
    assert not (tmp_path / "r").exists()


def test_bm25_missing_queries(capsys, tiny, tmp_path):
    queries = tmp_path / "missing.tsv"
    line = error_line(capsys, ["bm25", "--corpus", str(tiny), "--queries", str(queries), "--out", str(tmp_path / "r")])
    assert line == f"error: {queries}: file or directory not found"
    assert not (tmp_path / "r").exists()


def test_bm25_writes_a_run(capsys, tiny, tmp_path):
    run = tmp_path / "run.trec"
    out = ok(capsys, ["bm25", "--corpus", str(tiny), "--queries", str(tiny), "--out", str(run), "--topk", "3"])
    assert out.startswith("wrote ") and str(run) in out
    lines = run.read_text().splitlines()
    assert lines[0].split() == ["1", "Q0", "10", "1", lines[0].split()[4], "bm25"]
    assert {line.split()[0] for line in lines} == {"1", "2", "3"}


# ---------------------------------------------------------------- data validate

def test_validate_synthetic_passes(capsys, synthetic_dir):
    out = ok(capsys, ["data", "validate", str(synthetic_dir)])
    assert "corpus: 2000 passages" in out
    assert "dev: 200 queries, 200 qrels rows" in out
    assert "train: negatives for" in out


def test_validate_unknown_pid_in_negatives(capsys, synthetic_copy):
    path = synthetic_copy / "train.negatives.tsv"
    lines = path.read_text().splitlines()
    qid = lines[6].split("\t")[0]
    lines[6] = f"{qid}\t3,99999,5"
    path.write_text("\n".join(lines) + "\n")
    line = error_line(capsys, ["data", "validate", str(synthetic_copy)])
    assert line == f"error: {path}:7: unknown doc id '99999' (query {qid!r}) not in the corpus"


def test_validate_unknown_qid_in_negatives(capsys, synthetic_copy):
    path = synthetic_copy / "train.negatives.tsv"
    with open(path, "a") as f:
        f.write("no-such-query\t1,2\n")
    number = len(path.read_text().splitlines())
    line = error_line(capsys, ["data", "validate", str(synthetic_copy)])
    assert line == f"error: {path}:{number}: unknown query id 'no-such-query' not in the queries"


def test_validate_non_utf8_byte(capsys, synthetic_copy):
    path = synthetic_copy / "dev.query.txt"
    lines = path.read_bytes().split(b"\n")
    qid = lines[4].split(b"\t")[0]
    lines[4] = qid + b"\twhat is \xff here"
    path.write_bytes(b"\n".join(lines))
    col = len(qid) + len(b"\twhat is ") + 1
    line = error_line(capsys, ["data", "validate", str(synthetic_copy)])
    assert line == f"error: {path}:5: not valid UTF-8 (byte 0xff at column {col})"


def test_validate_unknown_pid_names_its_own_line(capsys, tmp_path):
    # The missing doc id '1' equals the relevance label of line 1; the error must still name line 2.
    d = tmp_path / "ds"
    d.mkdir()
    (d / "corpus.tsv").write_text("10\ta\n11\tb\n")
    (d / "dev.query.txt").write_text("5\tq five\n")
    (d / "qrels.dev.tsv").write_text("5 0 10 1\n5 0 1 1\n")
    line = error_line(capsys, ["data", "validate", str(d)])
    assert line == f"error: {d / 'qrels.dev.tsv'}:2: unknown doc id '1' (query '5') not in the corpus"


def test_validate_drop_missing_qrels(capsys, synthetic_copy):
    qrels_path = synthetic_copy / "qrels.dev.tsv"
    qrels = read_qrels(qrels_path)
    first, second = list(qrels)[:2]
    qrels[first]["gone-1"] = 1
    qrels[second]["gone-2"] = 1
    write_qrels(qrels_path, qrels)
    line = error_line(capsys, ["data", "validate", str(synthetic_copy)])
    assert "unknown doc id 'gone-1'" in line

    out = ok(capsys, ["data", "validate", str(synthetic_copy), "--drop-missing-qrels"])
    assert "dev: dropped 2 qrels rows whose doc is not in the corpus" in out
    assert "train: dropped 0 qrels rows whose doc is not in the corpus" in out
    rewritten = read_qrels(qrels_path)
    assert sum(len(j) for j in rewritten.values()) == 200
    assert "gone-1" not in rewritten[first] and "gone-2" not in rewritten[second]
    assert ok(capsys, ["data", "validate", str(synthetic_copy)])  # now clean


def test_validate_drop_missing_qrels_keeps_beir_qrels_readable(capsys, tmp_path):
    d = tmp_path / "beirish"
    (d / "qrels").mkdir(parents=True)
    (d / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "one"}\n{"_id": "d2", "title": "", "text": "two"}\n')
    (d / "queries.jsonl").write_text('{"_id": "q1", "text": "first"}\n{"_id": "q2", "text": "second"}\n')
    (d / "qrels" / "test.tsv").write_bytes(b"query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\nq1\tdX\t1\r\nq2\td2\t1\r\n")
    out = ok(capsys, ["data", "validate", str(d), "--drop-missing-qrels"])
    assert "test: dropped 1 qrels rows" in out
    assert read_qrels(d / "qrels" / "test.tsv") == {"q1": {"d1": 1}, "q2": {"d2": 1}}


def test_validate_drop_missing_qrels_keeps_lotte_qas_jsonl_readable(capsys, tmp_path):
    # LoTTE qrels are qas.<split>.jsonl; rewriting them must keep them JSON lines that read back.
    d = tmp_path / "lotte"
    d.mkdir()
    (d / "collection.tsv").write_text("0\tpassage zero\n1\tpassage one\n")
    (d / "questions.search.tsv").write_text("0\tquestion zero\n1\tquestion one\n")
    qas = d / "qas.search.jsonl"
    qas.write_text('{"qid": 0, "query": "question zero", "answer_pids": [0, 7]}\n'
                   '{"qid": 1, "query": "question one", "answer_pids": [1]}\n')
    out = ok(capsys, ["data", "validate", str(d), "--drop-missing-qrels"])
    assert "search: dropped 1 qrels rows" in out
    assert read_qrels(qas) == {"0": {"0": 1}, "1": {"1": 1}}
    assert ok(capsys, ["data", "validate", str(d)])


# ---------------------------------------------------------------- mine-negatives

def test_mine_negatives(capsys, tmp_path):
    run, qrels, out = tmp_path / "run.trec", tmp_path / "qrels.tsv", tmp_path / "negs.tsv"
    write_run(run, {"1": {"a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0, "e": 1.0},
                    "2": {"x": 2.0, "y": 1.0},
                    "3": {"p": 1.0}})
    qrels.write_text("1\t0\tb\t1\n1\t0\td\t0\n2\t0\tx\t1\n2\t0\ty\t1\n3\t0\tz\t1\n")
    stdout = ok(capsys, ["mine-negatives", "--run", str(run), "--qrels", str(qrels), "--out", str(out),
                         "--depth", "4", "--num", "2"])
    assert stdout.strip() == f"wrote negatives for 2 queries to {out}"
    # query 1: top-4 a b c d minus positive b -> a c d (d is judged 0: a negative), cut to 2;
    # query 2: every hit is positive -> no line; query 3: p
    assert out.read_text() == "1\ta,c\n3\tp\n"
    assert read_negatives(out) == {"1": ["a", "c"], "3": ["p"]}


def test_mine_negatives_missing_run(capsys, tmp_path):
    run = tmp_path / "none.trec"
    line = error_line(capsys, ["mine-negatives", "--run", str(run), "--qrels", str(tmp_path), "--out", str(tmp_path / "n")])
    assert line == f"error: {run}: file not found"


# ---------------------------------------------------------------- data prepare

def test_prepare_synthetic_writes_msmarco_layout(capsys, tmp_path):
    out_dir = tmp_path / "syn"
    stdout = ok(capsys, ["data", "prepare", "synthetic", "--out", str(out_dir), "--num-passages", "1000"])
    assert stdout.strip() == f"prepared synthetic in {out_dir}"
    for name in ("corpus.tsv", "train.query.txt", "dev.query.txt", "qrels.train.tsv", "qrels.dev.tsv",
                 "train.negatives.tsv"):
        assert (out_dir / name).is_file(), name
    corpus = Corpus.open(out_dir, progress=False)
    assert len(corpus) == 1000
    train, qrels = read_queries(out_dir / "train.query.txt"), read_qrels(out_dir / "qrels.train.tsv")
    negatives = read_negatives(out_dir / "train.negatives.tsv")
    assert negatives and set(negatives) <= set(train)
    for qid, pids in negatives.items():
        assert not set(pids) & {p for p, r in qrels[qid].items() if r > 0}
        assert len(pids) <= 200
    assert not corpus.missing({p for pids in negatives.values() for p in pids})
    assert "dev:" in ok(capsys, ["data", "validate", str(out_dir)])


def test_evaluate_compare_runs_a_paired_test(tmp_path, capsys):
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("".join(f"q{i} 0 d{i} 1\n" for i in range(20)))
    good, bad = tmp_path / "good.trec", tmp_path / "bad.trec"
    good.write_text("".join(f"q{i} Q0 d{i} 1 2.0 good\nq{i} Q0 x{i} 2 1.0 good\n" for i in range(20)))
    bad.write_text("".join(f"q{i} Q0 x{i} 1 2.0 bad\nq{i} Q0 d{i} 2 1.0 bad\n" for i in range(20)))
    assert main(["evaluate", str(good), str(qrels), "--metrics", "RR@10", "--compare", str(bad), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["RR@10"]
    assert (result["mean_a"], result["mean_b"]) == (1.0, 0.5)
    assert result["p_randomization"] < 0.01


# ---------------------------------------------------------------- encode / search

def load_shards(index_dir):
    return np.concatenate([np.load(p) for p in sorted(index_dir.glob("shard_*.npy"))])


def test_encode_search_evaluate(capsys, tmp_path, synthetic_dir, synthetic_corpus, tiny_model):
    from reprolib.modeling import DenseEncoder

    index = tmp_path / "index"
    out = ok(capsys, ["encode", "--model", str(tiny_model), "--corpus", str(synthetic_dir), "--out", str(index),
                      "--shard-size", "700", "--dtype", "float32"])
    assert out.strip() == f"encoded 2000 passages into 3 shards (dim 32, float32) in {index}"
    encoder = DenseEncoder.from_pretrained(tiny_model)
    items = [(p["title"], p["text"]) for p in synthetic_corpus]
    np.testing.assert_allclose(load_shards(index), encoder.encode_passages(items, template="plain"), atol=1e-6)

    # dev queries of the dataset directory: the run is the exact top-10 of each query (up to float ties)
    run_file = tmp_path / "dev.trec"
    out = ok(capsys, ["search", "--model", str(tiny_model), "--index", str(index), "--queries", str(synthetic_dir),
                      "--out", str(run_file), "--topk", "10"])
    assert out.strip() == f"wrote 2000 hits for 200 queries to {run_file}"
    queries = read_queries(synthetic_dir / "dev.query.txt")
    scores = encoder.encode_queries(list(queries.values())) @ load_shards(index).T
    run = read_run(run_file)
    assert list(run) == list(queries)
    for qid, row in zip(queries, scores):
        hits = run[qid]
        np.testing.assert_allclose(sorted(hits.values(), reverse=True), np.sort(row)[::-1][:10], atol=1e-5)
        np.testing.assert_allclose(list(hits.values()), row[synthetic_corpus.positions(list(hits))], atol=1e-5)
    assert set(json.loads(ok(capsys, ["evaluate", str(run_file), str(synthetic_dir), "--json"]))) == {
        "RR@10", "R@1000", "nDCG@10"}

    # a passage's own text as the query finds that passage first, through HNSW too
    picked = list(range(0, 2000, 97))
    (tmp_path / "q.tsv").write_text("".join(f"q{i}\t{items[i][0]} {items[i][1]}\n" for i in picked))
    (tmp_path / "qrels.tsv").write_text("".join(f"q{i} 0 {synthetic_corpus.id(i)} 1\n" for i in picked))
    for index_type in ("flat", "hnsw"):
        run_file = tmp_path / f"self-{index_type}.trec"
        ok(capsys, ["search", "--model", str(tiny_model), "--index", str(index), "--queries", str(tmp_path / "q.tsv"),
                    "--out", str(run_file), "--topk", "5", "--index-type", index_type])
        result = json.loads(ok(capsys, ["evaluate", str(run_file), str(tmp_path / "qrels.tsv"), "--metrics", "RR@10",
                                        "--json"]))
        assert result == {"RR@10": 1.0}
    assert (index / "hnsw_M32_efc200.faiss").exists()


def test_a_launched_worker_keeps_the_default_sigterm(monkeypatch):
    """torchrun stops its workers with SIGTERM; a worker waiting in a collective whose peer died would never run a
    Python handler, so a worker of `accelerate launch` is left to die at once."""
    import signal

    from reprolib.cli import _terminate_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with _terminate_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not before
    monkeypatch.setenv("LOCAL_RANK", "0")
    with _terminate_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGTERM) is before


def test_encode_resumes_after_an_interruption(capsys, monkeypatch, tmp_path, synthetic_dir, tiny_model):
    """`kill PID` while the second shard is being encoded: the verb says what it kept and exits 130; the same
    command encodes only what is missing."""
    import signal

    from reprolib.modeling.dense import DenseEncoder

    index = tmp_path / "index"
    argv = ["encode", "--model", str(tiny_model), "--corpus", str(synthetic_dir), "--out", str(index),
            "--shard-size", "700"]
    calls, resumed = [], False
    real = DenseEncoder.encode_passages

    def interrupted(self, passages, **kwargs):
        calls.append(len(passages))
        if calls == [700, 700] and not resumed:
            signal.raise_signal(signal.SIGTERM)
        return real(self, passages, **kwargs)

    class Unhandled(Exception):
        pass

    def unhandled(signum, frame):   # instead of the default, which would end pytest itself
        raise Unhandled("the verb let SIGTERM through")

    monkeypatch.setattr(DenseEncoder, "encode_passages", interrupted)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        assert main(argv) == 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    assert capsys.readouterr().err.splitlines()[-1].startswith("interrupted: what was written so far is kept")
    assert [p.name for p in sorted(index.glob("shard_*"))] == ["shard_00000.npy"]
    assert not list(index.glob("*.tmp*"))
    assert not json.loads((index / "index.json").read_text())["complete"]
    first = (index / "shard_00000.npy").stat().st_mtime_ns

    calls.clear()
    resumed = True
    ok(capsys, argv)
    assert calls == [700, 600]  # shards 1 and 2 only
    assert (index / "shard_00000.npy").stat().st_mtime_ns == first
    assert json.loads((index / "index.json").read_text())["complete"]
    fresh = tmp_path / "fresh"
    ok(capsys, argv[:-3] + [str(fresh), "--shard-size", "700"])
    np.testing.assert_array_equal(load_shards(index), load_shards(fresh))

    line = error_line(capsys, argv[:-1] + ["500"])
    assert line == f"error: {index} holds an index with shard_size=700, not 500; use a fresh directory or delete it"


def test_encode_bf16_autocast(capsys, tmp_path, synthetic_dir, tiny_model):
    runs = {}
    for precision in ("fp32", "bf16"):
        runs[precision] = tmp_path / precision
        ok(capsys, ["encode", "--model", str(tiny_model), "--corpus", str(synthetic_dir), "--out", str(runs[precision]),
                    "--dtype", "float32"] + (["--bf16"] if precision == "bf16" else []))
    full, half = load_shards(runs["fp32"]), load_shards(runs["bf16"])
    assert not np.array_equal(full, half)  # the matmuls did run in bf16 ...
    assert (np.sum(full * half, axis=1) > 0.99).all()  # ... and the vectors (unit length) barely moved


def test_search_without_faiss_says_how_to_install_it(capsys, tmp_path, synthetic_dir, tiny_model, monkeypatch):
    index = tmp_path / "index"
    ok(capsys, ["encode", "--model", str(tiny_model), "--corpus", str(synthetic_dir), "--out", str(index)])
    monkeypatch.setitem(sys.modules, "faiss", None)          # `import faiss` now raises ImportError
    run_file = tmp_path / "dev.trec"
    assert error_line(capsys, ["search", "--model", str(tiny_model), "--index", str(index), "--queries",
                               str(synthetic_dir), "--out", str(run_file)]) == (
        "error: dense search needs faiss, which is not installed: pip install 'reprolib[faiss]' (CPU), "
        "or conda install -c conda-forge faiss-gpu")
    assert not run_file.exists()


def test_encode_and_search_errors(capsys, tmp_path, synthetic_dir, tiny_model):
    import torch

    index = tmp_path / "index"
    base = ["encode", "--model", str(tiny_model), "--corpus", str(synthetic_dir), "--out", str(index)]
    missing = tmp_path / "nothing"
    assert error_line(capsys, ["encode", "--model", str(tiny_model), "--corpus", str(missing), "--out", str(index)]) \
        == f"error: {missing}: file or directory not found"
    assert error_line(capsys, ["encode", "--model", str(missing), "--corpus", str(synthetic_dir), "--out", str(index)]) \
        == f"error: {missing}: model folder not found"
    assert error_line(capsys, base + ["--template", "fancy"]).startswith("error: unknown text template 'fancy'")
    if not torch.cuda.is_available():
        assert error_line(capsys, base + ["--fp16"]) == \
            "error: fp16 needs a GPU (this process runs on the CPU); use bf16 on the CPU"
    assert not index.exists()

    search = ["search", "--model", str(tiny_model), "--queries", str(synthetic_dir), "--out", str(tmp_path / "run")]
    assert error_line(capsys, search + ["--index", str(tmp_path)]) == \
        f"error: {tmp_path} is not an index (no index.json); build it with `reprolib encode`"
    index.mkdir()
    (index / "index.json").write_text('{"complete": false}')
    assert error_line(capsys, search + ["--index", str(index)]) == \
        f"error: the index in {index} is incomplete; re-run `reprolib encode` to finish it"
    gone = tmp_path / "cache" / "corpus" / "gone"
    (index / "index.json").write_text(json.dumps({"complete": True, "corpus_store": str(gone), "template": "plain"}))
    assert error_line(capsys, search + ["--index", str(index)]) == (
        f"error: the corpus store {gone} that the index {index} was built from is gone (cache cleared?); "
        "re-run reprolib encode")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_encode_under_accelerate_launch_two_processes(tmp_path, synthetic_dir, tiny_model):
    """`accelerate launch -m reprolib encode` with 2 CPU processes (gloo) builds the single-process index."""
    index = tmp_path / "index"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "reprolib", "encode", "--model", str(tiny_model),
         "--corpus", str(synthetic_dir), "--out", str(index), "--shard-size", "300", "--dtype", "float32"],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("encoded 2000 passages into 7 shards") == 1  # printed by the main process only
    assert json.loads((index / "index.json").read_text())["complete"]
    single = tmp_path / "single"
    assert main(["encode", "--model", str(tiny_model), "--corpus", str(synthetic_dir), "--out", str(single),
                 "--shard-size", "300", "--dtype", "float32"]) == 0
    np.testing.assert_allclose(load_shards(index), load_shards(single), atol=1e-6)


@pytest.mark.slow
def test_search_under_accelerate_launch_two_processes_splits_the_shards(tmp_path, synthetic_dir, tiny_model):
    """`accelerate launch -m reprolib search` with 2 CPU processes: each searches half of the 7 shards, the main
    process writes the merged run, the same as one process's."""
    index = tmp_path / "index"
    assert main(["encode", "--model", str(tiny_model), "--corpus", str(synthetic_dir), "--out", str(index),
                 "--shard-size", "300", "--dtype", "float32"]) == 0
    search = ["search", "--model", str(tiny_model), "--index", str(index), "--queries", str(synthetic_dir),
              "--split", "dev", "--topk", "50"]
    assert main(search + ["--out", str(tmp_path / "single.run")]) == 0
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "reprolib", *search,
         "--out", str(tmp_path / "two.run")], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1 and "(7 shards split over 2 processes)" in result.stdout
    assert "searching shards: 100%|██████████| 4/4" in result.stderr      # the main process's half: 0, 2, 4, 6
    assert (tmp_path / "two.run").read_text() == (tmp_path / "single.run").read_text()
