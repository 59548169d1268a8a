"""Hostile input, table by table: every bad file, option or stale output ends in exit 2 and one line naming the
problem (and the file and line where there is one), with no traceback, the inputs unchanged and nothing
marked complete that is not. Good inputs in an odd dress (a byte-order mark, CRLF) read as the plain ones.
"""
import gzip
import re
import json

import numpy as np
import pytest

from reprolib.cli import main
from reprolib.data import read_negatives, read_qrels, read_queries, read_run, read_scores, write_run
from reprolib.data.corpus import Corpus
from reprolib.errors import DataError, ReprolibError
from test_cli import error_line, ok


@pytest.fixture
def small(tmp_path):
    """Five passages, three queries, their qrels and a run, as plain files."""
    (tmp_path / "corpus.tsv").write_text("".join(f"d{i}\tTitle {i}\tpassage {i} about topic{i}\n" for i in range(5)))
    (tmp_path / "queries.tsv").write_text("q0\ttopic0\nq1\ttopic1\nq2\ttopic2\n")
    (tmp_path / "qrels.trec").write_text("q0 0 d0 1\nq1 0 d1 1\nq2 0 d2 1\n")
    (tmp_path / "run.trec").write_text("".join(f"q{q} Q0 d{d} {r + 1} {5 - r}.0 t\n"
                                               for q in range(3) for r, d in enumerate([q, (q + 1) % 5])))
    (tmp_path / "negatives.tsv").write_text("q0\td1,d2\nq1\td2,d3\nq2\td3,d4\n")
    (tmp_path / "scores.tsv").write_text("q0 d0 3.5\nq0 d1 1.25\nq1 d1 2.0\n")
    return tmp_path


# ---------------------------------------------------------------- readers: a BOM or CRLF changes nothing

BOM = "\ufeff"


@pytest.mark.parametrize("name, read", [
    ("qrels.trec", read_qrels),
    ("run.trec", read_run),
    ("queries.tsv", read_queries),
    ("negatives.tsv", read_negatives),
    ("scores.tsv", read_scores),
])
@pytest.mark.parametrize("dress", ["bom", "crlf", "bom+crlf"])
def test_a_bom_or_crlf_reads_as_the_plain_file(small, name, read, dress):
    plain = (small / name).read_text()
    text = plain.replace("\n", "\r\n") if "crlf" in dress else plain
    dressed = small / f"dressed_{name}"
    dressed.write_text(BOM + text if "bom" in dress else text, newline="")
    assert read(dressed) == read(small / name)


def test_beir_qrels_header_is_recognised_after_a_bom(tmp_path):
    (tmp_path / "qrels.tsv").write_text(BOM + "query-id\tcorpus-id\tscore\nq0\td0\t1\n")
    assert read_qrels(tmp_path / "qrels.tsv") == {"q0": {"d0": 1}}


def test_a_bom_does_not_become_part_of_the_first_passage_id(small):
    (small / "bom.tsv").write_text(BOM + (small / "corpus.tsv").read_text())
    assert Corpus.open(small / "bom.tsv", progress=False).id(0) == "d0"


def test_evaluate_with_bom_files_scores_like_the_plain_ones(capsys, small):
    for name in ("run.trec", "qrels.trec"):
        (small / f"bom_{name}").write_text(BOM + (small / name).read_text())
    plain = json.loads(ok(capsys, ["evaluate", str(small / "run.trec"), str(small / "qrels.trec"), "--json"]))
    dressed = json.loads(ok(capsys, ["evaluate", str(small / "bom_run.trec"), str(small / "bom_qrels.trec"), "--json"]))
    assert dressed == plain and plain["RR@10"] == 1.0


# ---------------------------------------------------------------- readers: bad values, named by file and line

@pytest.mark.parametrize("file, content, line, problem", [
    ("c.jsonl", '{"_id": "a", "text": "x"}\n{"_id": null, "text": "y"}\n', 2, "passage id must be a string or an integer, got null"),
    ("c.jsonl", '{"_id": "a", "title": 5, "text": "x"}\n', 1, "field 'title' must be a string, got 5"),
    ("c.jsonl", '{"_id": "doc 7", "text": "x"}\n', 1, "passage id 'doc 7' contains whitespace"),
    ("c.jsonl", '{"_id": true, "text": "x"}\n', 1, "passage id must be a string or an integer, got true"),
    ("c.tsv", "a b\ttext\n", 1, "passage id 'a b' contains whitespace"),
    ("c.jsonl", "", None, "no passages: the corpus is empty"),
])
def test_bad_corpus_values(tmp_path, file, content, line, problem):
    (tmp_path / file).write_text(content)
    with pytest.raises(DataError) as info:
        Corpus.open(tmp_path / file, progress=False)
    assert (info.value.line, info.value.path) == (line, str((tmp_path / file).resolve()))
    assert problem in info.value.problem


@pytest.mark.parametrize("file, content, line, problem", [
    ("q.jsonl", '{"_id": "q1", "text": 12345}\n', 1, "field 'text' must be a string, got 12345"),
    ("q.jsonl", '{"_id": null, "text": "x"}\n', 1, "query id must be a string or an integer, got null"),
    ("q.tsv", "q 1\ttext\n", 1, "query id 'q 1' contains whitespace"),
])
def test_bad_query_values(tmp_path, file, content, line, problem):
    (tmp_path / file).write_text(content)
    with pytest.raises(DataError) as info:
        read_queries(tmp_path / file)
    assert info.value.line == line and problem in info.value.problem


@pytest.mark.parametrize("score", ["nan", "inf", "-inf"])
def test_a_run_or_teacher_score_that_is_not_finite_is_refused(tmp_path, score):
    (tmp_path / "run.trec").write_text(f"q0 Q0 d0 1 1.0 t\nq0 Q0 d1 2 {score} t\n")
    with pytest.raises(DataError, match=r"run.trec:2: score .* is not a finite number"):
        read_run(tmp_path / "run.trec")
    (tmp_path / "scores.tsv").write_text(f"q0 d0 1.0\nq0 d1 [{score}]\n")
    with pytest.raises(DataError, match=r"scores.tsv:2: score .* is not a finite number"):
        read_scores(tmp_path / "scores.tsv")


@pytest.mark.parametrize("bad, message", [
    ({"q1": {"d0": 2.0, "doc 7": 1.0}}, "doc id 'doc 7'"),
    ({"q1": {"d0": 2.0, "": 1.0}}, "doc id ''"),
    ({"q\t1": {"d0": 2.0}}, "query id 'q\\t1'"),
    ({"q1": {"d0": 2.0, "d\u20031": 1.0}}, "doc id 'd\\u20031'"),     # an em space is whitespace too
])
def test_a_run_cannot_be_written_with_an_id_holding_a_space(tmp_path, bad, message):
    """Found wherever it is (after a good query here), named, and nothing is written."""
    with pytest.raises(DataError, match=re.escape(f"{message} is empty or contains whitespace")):
        write_run(tmp_path / "run.trec", {"q0": {"d0": 1.0}, **bad})
    assert not (tmp_path / "run.trec").exists()


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_a_damaged_gzip_corpus_is_one_line(capsys, small, damage):
    whole = gzip.compress(("".join(f'{{"_id": "d{i}", "text": "passage {i} ' + "word " * 50 + '"}\n'
                                   for i in range(200))).encode())
    path = small / "c.jsonl.gz"
    path.write_bytes(whole[:len(whole) // 2] if damage == "truncated" else b"plain text, not gzip\n")
    line = error_line(capsys, ["bm25", "--corpus", str(path), "--queries", str(small / "queries.tsv"),
                               "--out", str(small / "o.trec")])
    assert "c.jsonl.gz" in line and "damaged gzip file" in line
    assert not (small / "o.trec").exists()


# ---------------------------------------------------------------- options: every count must be >= 1

def _bm25(s):
    return ["bm25", "--corpus", str(s / "corpus.tsv"), "--queries", str(s / "queries.tsv"), "--out", str(s / "o.trec")]


def _mine(s):
    return ["mine-negatives", "--run", str(s / "run.trec"), "--qrels", str(s / "qrels.trec"), "--out", str(s / "n.tsv")]


def _encode(s):
    return ["encode", "--model", str(s / "no-model"), "--corpus", str(s / "corpus.tsv"), "--out", str(s / "idx")]


def _search(s):
    return ["search", "--model", str(s / "no-model"), "--index", str(s / "idx"), "--queries", str(s / "queries.tsv"),
            "--out", str(s / "o.trec")]


def _rerank(s):
    return ["rerank", "--model", str(s / "no-model"), "--run", str(s / "run.trec"), "--corpus", str(s / "corpus.tsv"),
            "--queries", str(s / "queries.tsv"), "--out", str(s / "o.trec")]


def _score(s):
    return ["score", "--model", str(s / "no-model"), "--run", str(s / "run.trec"), "--qrels", str(s / "qrels.trec"),
            "--corpus", str(s / "corpus.tsv"), "--queries", str(s / "queries.tsv"), "--out", str(s / "o.tsv")]


@pytest.mark.parametrize("command, option", [
    (_bm25, "--topk"), (_mine, "--depth"), (_mine, "--num"),
    (_encode, "--batch-size"), (_encode, "--max-len"), (_encode, "--shard-size"),
    (_search, "--topk"), (_search, "--batch-size"), (_search, "--max-len"),
    (_rerank, "--depth"), (_rerank, "--batch-size"), (_score, "--depth"), (_score, "--batch-size"),
])
@pytest.mark.parametrize("value", ["0", "-3", "five"])
def test_counts_below_one_are_refused_before_any_work(capsys, small, command, option, value):
    line = error_line(capsys, command(small) + [option, value])
    assert f"argument {option}" in line
    assert not any(p.exists() for p in (small / "o.trec", small / "n.tsv", small / "idx", small / "o.tsv"))


@pytest.mark.parametrize("option, value, problem", [
    ("--k1", "-1", "must be a finite number >= 0"), ("--k1", "nan", "must be a finite number >= 0"),
    ("--b", "7", "must be between 0 and 1"), ("--b", "-0.5", "must be a finite number >= 0"),
])
def test_bm25_parameters_out_of_range(capsys, small, option, value, problem):
    assert problem in error_line(capsys, _bm25(small) + [option, value])


# ---------------------------------------------------------------- outputs: never over an input, OS errors in one line

@pytest.mark.parametrize("command, name", [(_bm25, "corpus.tsv"), (_bm25, "queries.tsv"), (_mine, "run.trec"),
                                           (_mine, "qrels.trec")])
def test_out_equal_to_an_input_is_refused(capsys, small, command, name):
    before = (small / name).read_bytes()
    argv = command(small)
    argv[argv.index("--out") + 1] = str(small / name)
    assert f"is also the --{name.split('.')[0]} input" in error_line(capsys, argv)
    assert (small / name).read_bytes() == before


# ---------------------------------------------------------------- indexes: bound to their corpus and model

@pytest.fixture
def self_queries(tmp_path, synthetic_corpus):
    """Twenty passages' own texts as queries, each judged relevant to its passage."""
    picked = range(0, 2000, 100)
    (tmp_path / "q.tsv").write_text("".join(f"q{i}\t{synthetic_corpus.title(i)} {synthetic_corpus.text(i)}\n"
                                            for i in picked))
    (tmp_path / "qrels.tsv").write_text("".join(f"q{i} 0 {synthetic_corpus.id(i)} 1\n" for i in picked))
    return tmp_path / "q.tsv", tmp_path / "qrels.tsv"


def _rr(capsys, model, index, queries, qrels, out):
    ok(capsys, ["search", "--model", str(model), "--index", str(index), "--queries", str(queries), "--out", str(out),
                "--topk", "10"])
    return json.loads(ok(capsys, ["evaluate", str(out), str(qrels), "--metrics", "RR@10", "--json"]))["RR@10"]


def test_an_edited_corpus_is_encoded_again(capsys, tmp_path, synthetic_dir, tiny_model, self_queries):
    """Same passages in a new order: same count, kind, dtype and template, so only the fingerprint tells."""
    lines = (synthetic_dir / "corpus.tsv").read_text().splitlines(keepends=True)
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("".join(lines))
    index = tmp_path / "index"
    encode = ["encode", "--model", str(tiny_model), "--corpus", str(corpus), "--out", str(index), "--shard-size", "700"]
    ok(capsys, encode)
    assert _rr(capsys, tiny_model, index, *self_queries, tmp_path / "a.trec") == 1.0
    corpus.write_text("".join(reversed(lines)))
    ok(capsys, encode)
    assert _rr(capsys, tiny_model, index, *self_queries, tmp_path / "b.trec") == 1.0


def test_another_model_encodes_again(capsys, tmp_path, synthetic_dir, tiny_model):
    import torch

    from reprolib.modeling import DenseEncoder

    index = tmp_path / "index"
    encode = ["encode", "--corpus", str(synthetic_dir), "--out", str(index), "--shard-size", "1000", "--dtype", "float32"]
    ok(capsys, encode + ["--model", str(tiny_model)])
    other = DenseEncoder.from_pretrained(tiny_model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.5)
    ok(capsys, encode + ["--model", str(other.save(tmp_path / "other"))])
    first = np.load(index / "shard_00000.npy")[:3]
    items = [(Corpus.open(synthetic_dir, progress=False).title(i), Corpus.open(synthetic_dir, progress=False).text(i))
             for i in range(3)]
    np.testing.assert_allclose(first, other.encode_passages(items, template="plain"), atol=1e-5)


@pytest.mark.parametrize("change", ["max_len", "pooling", "bf16"])
def test_the_same_weights_encoded_otherwise_encode_again(capsys, tmp_path, synthetic_dir, tiny_model, change):
    """A shorter passage length (notebook 30's `passage_max_len`), the same weights saved with another pooling, or
    run in bf16, give other vectors: the old shards must not be kept as done (nor mixed with new ones)."""
    from reprolib.modeling import DenseEncoder

    index = tmp_path / "index"
    encode = ["encode", "--corpus", str(synthetic_dir), "--out", str(index), "--shard-size", "1000", "--dtype", "float32"]
    ok(capsys, encode + ["--model", str(tiny_model)])
    first = np.load(index / "shard_00000.npy")
    if change == "bf16":   # a random-init model's vectors move by about 2e-5: that they changed is the check
        meta = json.loads((index / "index.json").read_text())
        del meta["precision"]   # as written before it was recorded: float32, kept as done
        (index / "index.json").write_text(json.dumps(meta))
        stamp = (index / "shard_00000.npy").stat().st_mtime_ns
        ok(capsys, encode + ["--model", str(tiny_model)])
        assert (index / "shard_00000.npy").stat().st_mtime_ns == stamp
        ok(capsys, encode + ["--model", str(tiny_model), "--bf16"])
        assert json.loads((index / "index.json").read_text())["precision"] == "bf16"
        assert not np.array_equal(np.load(index / "shard_00000.npy"), first)
        return
    if change == "max_len":
        model, options = tiny_model, {"max_length": 8}
        ok(capsys, encode + ["--model", str(model), "--max-len", "8"])
    else:
        model, options = DenseEncoder.from_pretrained(tiny_model, pooling="cls").save(tmp_path / "cls"), {}
        ok(capsys, encode + ["--model", str(model)])
    corpus = Corpus.open(synthetic_dir, progress=False)
    items = [(corpus.title(i), corpus.text(i)) for i in range(3)]
    expected = DenseEncoder.from_pretrained(model).encode_passages(items, template="plain", **options)
    assert np.abs(expected - first[:3]).max() > 1e-3
    np.testing.assert_allclose(np.load(index / "shard_00000.npy")[:3], expected, atol=1e-5)


@pytest.mark.parametrize("damage", ["nan", "short"])
def test_a_damaged_shard_is_never_taken_as_done(capsys, tmp_path, synthetic_dir, tiny_model, self_queries, damage):
    index = tmp_path / "index"
    encode = ["encode", "--model", str(tiny_model), "--corpus", str(synthetic_dir), "--out", str(index),
              "--shard-size", "1000"]
    ok(capsys, encode)
    shard = index / "shard_00001.npy"
    vectors = np.load(shard)
    if damage == "nan":
        vectors[5] = np.nan
        np.save(shard, vectors)
        ok(capsys, encode)                # a shard with NaN is not complete: it is encoded again
        assert np.isfinite(np.load(shard)).all()
        assert _rr(capsys, tiny_model, index, *self_queries, tmp_path / "a.trec") == 1.0
    else:
        np.save(shard, vectors[:900])     # a shard cut short after the index was marked complete
        line = error_line(capsys, ["search", "--model", str(tiny_model), "--index", str(index), "--queries",
                                   str(self_queries[0]), "--out", str(tmp_path / "o.trec")])
        assert "shard_00001.npy: 900 rows, but index.json promises 1000" in line
        assert not (tmp_path / "o.trec").exists()


def test_a_model_folder_without_its_tokenizer_is_refused(capsys, tmp_path, synthetic_dir, tiny_model):
    """transformers 5 loads a folder without tokenizer files with a handful of tokens: every word is [UNK]."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (broken / name).unlink(missing_ok=True)
    line = error_line(capsys, ["encode", "--model", str(broken), "--corpus", str(synthetic_dir), "--out",
                               str(tmp_path / "idx")])
    assert "tokenizer" in line
    assert not (tmp_path / "idx" / "shard_00000.npy").exists()


# ---------------------------------------------------------------- no data loss

def test_dropping_missing_qrels_of_a_prepared_dataset_leaves_its_source_alone(capsys, tmp_path):
    """`data prepare` of a local dataset links its files and folders; the rewrite must not go through them."""
    source = tmp_path / "source"
    (source / "qrels").mkdir(parents=True)
    (source / "corpus.jsonl").write_text('{"_id": "d1", "text": "one"}\n{"_id": "d2", "text": "two"}\n')
    (source / "queries.jsonl").write_text('{"_id": "q1", "text": "first"}\n{"_id": "q2", "text": "second"}\n')
    qrels = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\tdX\t1\nq2\td2\t1\n"
    (source / "qrels" / "test.tsv").write_text(qrels)
    prepared = tmp_path / "prepared"
    ok(capsys, ["data", "prepare", str(source), "--out", str(prepared)])
    assert (prepared / "qrels").is_symlink()
    assert "test: dropped 1 qrels rows" in ok(capsys, ["data", "validate", str(prepared), "--drop-missing-qrels"])
    assert (source / "qrels" / "test.tsv").read_text() == qrels
    assert read_qrels(prepared / "qrels" / "test.tsv") == {"q1": {"d1": 1}, "q2": {"d2": 1}}


# ---------------------------------------------------------------- damaged files: one line, not a traceback

@pytest.fixture
def built_index(capsys, tmp_path, synthetic_dir, tiny_model):
    index = tmp_path / "index"
    ok(capsys, ["encode", "--model", str(tiny_model), "--corpus", str(synthetic_dir), "--out", str(index),
                "--shard-size", "1000"])
    return index


@pytest.mark.parametrize("damage, problem", [
    ("truncated index.json", "index.json: not valid JSON"),
    ("truncated shard", "shard_00000.npy: cannot read the shard"),
    ("deleted shard", "shard_00000.npy"),
])
def test_a_damaged_index_is_one_line_at_search(capsys, tmp_path, built_index, tiny_model, synthetic_dir, damage, problem):
    meta, shard = built_index / "index.json", built_index / "shard_00000.npy"
    if damage == "truncated index.json":
        meta.write_text(meta.read_text()[:100])
    elif damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:20000])
    else:
        shard.unlink()
    line = error_line(capsys, ["search", "--model", str(tiny_model), "--index", str(built_index), "--queries",
                               str(synthetic_dir), "--out", str(tmp_path / "o.trec")])
    assert problem in line
    assert not (tmp_path / "o.trec").exists()


def test_a_damaged_model_is_one_line(capsys, tmp_path, tiny_model, synthetic_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = error_line(capsys, ["encode", "--model", str(broken), "--corpus", str(synthetic_dir), "--out",
                               str(tmp_path / "idx")])
    assert line.startswith(f"error: cannot load model {broken}")


@pytest.mark.parametrize("option, value, problem", [
    ("batch_size", "eight", "batch_size must be an integer, not 'eight'"),
    ("batch_size", 0, "batch_size must be at least 1, not 0"),
    ("learning_rate", -0.1, "learning_rate must be > 0, not -0.1"),
    ("learning_rate", "fast", "learning_rate must be a number, not 'fast'"),
    ("epochs", 1.5, "epochs must be an integer, not 1.5"),
    ("normalize", "yes", "normalize must be true or false, not 'yes'"),
    ("negatives", 3, "negatives must be a string or a list, not 3"),
    ("negatives", [], "negatives must be a file or a list of files, not []"),
    ("negatives", ["a.tsv", 3], "negatives must be a file or a list of files, not ['a.tsv', 3]"),
    ("batch_size", float("inf"), "batch_size must be an integer, not inf"),
    ("log_steps", 0, "log_steps must be at least 1, not 0"),          # divided by: the main process alone crashed
    ("max_steps", -3, "max_steps must be at least 0, not -3"),        # trained 0 steps and saved the start
    ("temperature", 0.0, "temperature must be > 0, not 0.0"),
    ("warmup_ratio", 1.5, "warmup_ratio must be in [0, 1], not 1.5"),
])
def test_training_options_of_the_wrong_type(capsys, tmp_path, option, value, problem):
    import yaml

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": "scratch:micro", "out_dir": str(tmp_path / "out"),
                                      "train_data": str(tmp_path), option: value}))
    assert error_line(capsys, ["train", str(config)]) == f"error: {config}: {problem}"


@pytest.mark.parametrize("options, problem", [
    (dict(objective="lexmae", encoder_mask_ratio=0.3, decoder_mask_ratio=0.15),
     "LexMAE's decoder masks the encoder's positions and more: decoder_mask_ratio 0.15 must be at least "
     "encoder_mask_ratio 0.3"),   # silently masked 30%: the decoder's extra rate came out negative
    (dict(objective="lexmae", pack=True), "pack builds RetroMAE's blocks of text; the lexmae objective takes one "
                                          "passage a sequence"),   # silently ignored
])
def test_pretraining_options_that_would_be_ignored_are_refused(capsys, tmp_path, options, problem):
    import yaml

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": "scratch:micro", "out_dir": str(tmp_path / "out"),
                                      "train_data": str(tmp_path), **options}))
    assert error_line(capsys, ["train", str(config)]) == f"error: {config}: {problem}"


@pytest.mark.parametrize("objective", ["retromae", "lexmae", "cross_encoder"])
def test_cross_device_is_refused_where_nothing_is_gathered(capsys, tmp_path, objective):
    import yaml

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": "scratch:micro", "out_dir": str(tmp_path / "out"), "train_data":
                                      str(tmp_path), "objective": objective, "cross_device": True}))
    assert error_line(capsys, ["train", str(config)]) == (
        f"error: {config}: cross_device gathers a retriever's in-batch negatives, not the {objective} objective's")


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path):
    from reprolib.training import TrainConfig

    config = tmp_path / "train.yaml"
    config.write_text(f"model: scratch:micro\nout_dir: {tmp_path}/out\ntrain_data: {tmp_path}\nlearning_rate: 2e-5\n")
    assert TrainConfig.from_yaml(config).learning_rate == 2e-5


@pytest.mark.parametrize("entry", ['"done"', '{"status": 1}', '{"params_hash": "x"}'])
def test_a_damaged_manifest_is_one_line(capsys, tmp_path, entry):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text('{"run": "r", "stages": {"a": ' + entry + "}}")
    line = error_line(capsys, ["status", str(run_dir)])
    assert "manifest.json: stage 'a' is not a stage record" in line


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch, small):
    import reprolib.search

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reprolib.search, "bm25_search", interrupted)
    assert main(_bm25(small)) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("interrupted:") and "Traceback" not in err


@pytest.mark.parametrize("argv, problem", [
    (lambda s: ["evaluate", str(s / "empty.trec"), str(s / "qrels.trec")], "empty.trec: no hits: the run file is empty"),
    (lambda s: ["evaluate", str(s / "run.trec"), str(s / "empty.trec")], "empty.trec: no judgements: the qrels file is empty"),
    (lambda s: ["rerank", "--model", "x", "--run", str(s / "unknown.trec"), "--corpus", str(s / "corpus.tsv"),
                "--queries", str(s / "queries.tsv"), "--out", str(s / "o.trec")],
     "unknown.trec:2: unknown doc id 'nope' (query 'q0') not in the corpus"),
])
def test_errors_name_the_file(capsys, small, argv, problem):
    (small / "empty.trec").write_text("")
    (small / "unknown.trec").write_text("q0 Q0 d0 1 2.0 t\nq0 Q0 nope 2 1.0 t\n")
    assert error_line(capsys, argv(small)).endswith(problem)


def test_a_write_that_fails_names_the_output(capsys, small):
    """The OS error of a write names the temp file beside the output: the message names the output itself."""
    (small / "adir").mkdir()
    argv = _bm25(small)
    argv[argv.index("--out") + 1] = str(small / "adir")
    assert error_line(capsys, argv) == f"error: {small / 'adir'}: cannot write here (Is a directory)"


def test_a_corpus_store_that_cannot_be_built_is_one_line(capsys, small, monkeypatch):
    import errno

    import reprolib.data.corpus as corpus_module

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(corpus_module, "_write_store", full_disk)
    line = error_line(capsys, _bm25(small))
    assert "cannot build the corpus store" in line and "No space left on device" in line and "REPROLIB_CACHE" in line


# ---------------------------------------------------------------- every reader: a NUL byte or bad UTF-8 is located

def _read_corpus(path):
    return Corpus.open(path, progress=False)


@pytest.mark.parametrize("name, read", [("qrels.trec", read_qrels), ("run.trec", read_run), ("queries.tsv", read_queries),
                                        ("negatives.tsv", read_negatives), ("scores.tsv", read_scores),
                                        ("corpus.tsv", _read_corpus)])
@pytest.mark.parametrize("bad, problem", [(b"\x00", "NUL byte at column"), (b"\xe9", "not valid UTF-8 (byte 0xe9")])
def test_a_bad_byte_is_reported_with_its_line(small, name, read, bad, problem):
    lines = (small / name).read_bytes().splitlines(keepends=True)
    lines[1] = lines[1][:3] + bad + lines[1][3:]
    (small / f"bad_{name}").write_bytes(b"".join(lines))
    with pytest.raises(DataError) as info:
        read(small / f"bad_{name}")
    assert info.value.line == 2 and problem in info.value.problem


def test_an_encoder_that_returns_nan_writes_no_shard(capsys, monkeypatch, tmp_path, synthetic_dir, tiny_model):
    from reprolib.modeling import DenseEncoder

    original = DenseEncoder.encode_passages

    def nan_in_row_3(self, *args, **kwargs):
        vectors = original(self, *args, **kwargs)
        vectors[3] = np.nan
        return vectors

    monkeypatch.setattr(DenseEncoder, "encode_passages", nan_in_row_3)
    index = tmp_path / "index"
    line = error_line(capsys, ["encode", "--model", str(tiny_model), "--corpus", str(synthetic_dir), "--out", str(index),
                               "--shard-size", "1000"])
    assert "NaN or infinite values for passages 0-999" in line
    assert not (index / "shard_00000.npy").exists()


def test_a_training_config_built_in_code_is_checked_too(tmp_path):
    from reprolib.training import TrainConfig, train

    with pytest.raises(ReprolibError, match="config: log_steps must be at least 1, not 0"):
        train(TrainConfig(model="scratch:micro", out_dir=str(tmp_path / "out"), train_data=str(tmp_path), log_steps=0))
    assert not (tmp_path / "out").exists()
