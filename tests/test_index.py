"""The sharded dense index: shard files, resume, dtypes, and shard-merged search == brute force."""
import hashlib
import json
import os
import time

import numpy as np
import pytest

from reprolib.data.corpus import Corpus
from reprolib.data.templates import get_template
from reprolib.errors import ReprolibError
from reprolib.index import encode_corpus, run_from_hits, search, shard_path

DIM = 16
NUM = 53


class FakeEncoder:
    """encode_passages-compatible: a deterministic random vector per rendered text; counts calls."""

    def __init__(self):
        self.calls = []

    def encode_passages(self, passages, batch_size=64, max_length=None, progress=False, template=None):
        tpl = get_template(template) if template is not None else None
        texts = [tpl.render(*p, sep="[SEP]") if tpl else p for p in passages]
        self.calls.append(len(texts))
        return np.stack([vector(t) for t in texts]).astype(np.float32)


def vector(text):
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


@pytest.fixture
def corpus(tmp_path):
    source = tmp_path / "corpus.tsv"
    source.write_text("".join(f"p{i}\ttitle {i}\tpassage number {i} about topic {i % 7}\n" for i in range(NUM)))
    return Corpus.open(source, progress=False)


def full_matrix(corpus):
    return np.stack([vector(f"title {i} passage number {i} about topic {i % 7}") for i in range(len(corpus))])


def test_shards_written_and_metadata(corpus, tmp_path):
    out = tmp_path / "index"
    meta = encode_corpus(FakeEncoder(), corpus, out, shard_size=20, dtype="float32", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard_00000.npy", "shard_00001.npy",
                                                     "shard_00002.npy"]
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk == meta
    assert meta["num_passages"] == NUM and meta["dim"] == DIM and meta["num_shards"] == 3
    assert meta["shard_size"] == 20 and meta["dtype"] == "float32" and meta["template"] == "plain"
    assert meta["corpus_store"] == str(corpus.store_dir) and meta["complete"]
    shards = [np.load(shard_path(out, s)) for s in range(3)]
    assert [len(s) for s in shards] == [20, 20, 13]
    np.testing.assert_array_equal(np.concatenate(shards), full_matrix(corpus))  # row i = passage i
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_resume_rebuilds_only_missing_shard(corpus, tmp_path):
    out = tmp_path / "index"
    encode_corpus(FakeEncoder(), corpus, out, shard_size=20, progress=False)
    old = {s: os.stat(shard_path(out, s)).st_mtime_ns for s in range(3)}
    shard_path(out, 1).unlink()
    time.sleep(0.02)
    encoder = FakeEncoder()
    encode_corpus(encoder, corpus, out, shard_size=20, progress=False)
    assert encoder.calls == [20]  # only shard 1 was encoded
    new = {s: os.stat(shard_path(out, s)).st_mtime_ns for s in range(3)}
    assert new[0] == old[0] and new[2] == old[2] and new[1] > old[1]
    np.testing.assert_allclose(np.load(shard_path(out, 1)), full_matrix(corpus)[20:40].astype(np.float16))

    again = FakeEncoder()
    encode_corpus(again, corpus, out, shard_size=20, progress=False)  # complete: nothing to do
    assert again.calls == []
    with pytest.raises(ReprolibError, match="shard_size"):
        encode_corpus(FakeEncoder(), corpus, out, shard_size=10, progress=False)


def test_the_warning_for_shards_encoded_again_names_every_reason(corpus, tmp_path, caplog):
    out = tmp_path / "index"
    encode_corpus(FakeEncoder(), corpus, out, shard_size=20, max_length=32, progress=False)
    meta = json.loads((out / "index.json").read_text())
    del meta["passage_max_len"]               # as an index written before the length was recorded
    meta["corpus_fingerprint"] = "another corpus"
    (out / "index.json").write_text(json.dumps(meta))
    encoder = FakeEncoder()
    encode_corpus(encoder, corpus, out, shard_size=20, max_length=32, progress=False)
    assert encoder.calls == [20, 20, 13]
    assert "the corpus changed since its shards were written; its shards were written before the passage max " \
           "length was recorded; encoding every shard again" in caplog.text


def test_fp16_vs_fp32(corpus, tmp_path):
    encode_corpus(FakeEncoder(), corpus, tmp_path / "f16", shard_size=20, dtype="float16", progress=False)
    encode_corpus(FakeEncoder(), corpus, tmp_path / "f32", shard_size=20, dtype="float32", progress=False)
    a, b = np.load(shard_path(tmp_path / "f16", 0)), np.load(shard_path(tmp_path / "f32", 0))
    assert a.dtype == np.float16 and b.dtype == np.float32
    assert (tmp_path / "f16" / "shard_00000.npy").stat().st_size < (tmp_path / "f32" / "shard_00000.npy").stat().st_size
    np.testing.assert_allclose(a.astype(np.float32), b, rtol=1e-3, atol=1e-3)
    queries = np.random.default_rng(1).standard_normal((5, DIM)).astype(np.float32)
    s16, p16 = search(queries, tmp_path / "f16", topk=5, use_gpu=False)
    s32, p32 = search(queries, tmp_path / "f32", topk=5, use_gpu=False)
    assert s16.dtype == np.float32
    np.testing.assert_allclose(s16, s32, atol=0.05)
    assert (p16[:, 0] == p32[:, 0]).all()
    with pytest.raises(ReprolibError):
        encode_corpus(FakeEncoder(), corpus, tmp_path / "bad", dtype="int8", progress=False)


@pytest.mark.parametrize("topk", [1, 7, 20, 35, 1000])  # smaller than, equal to, larger than a shard; > corpus
def test_search_equals_brute_force(corpus, tmp_path, topk):
    out = tmp_path / "index"
    encode_corpus(FakeEncoder(), corpus, out, shard_size=20, dtype="float32", progress=False)
    matrix = full_matrix(corpus)
    queries = np.random.default_rng(0).standard_normal((9, DIM)).astype(np.float32)
    scores, positions = search(queries, out, topk=topk, use_gpu="auto")
    k = min(topk, NUM)
    assert scores.shape == positions.shape == (9, k)
    full = queries @ matrix.T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(positions, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, axis=1), rtol=1e-5, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_run_from_hits(corpus, tmp_path):
    out = tmp_path / "index"
    encode_corpus(FakeEncoder(), corpus, out, shard_size=20, progress=False)
    matrix = full_matrix(corpus)
    queries = matrix[[3, 41]]  # each passage's own vector is (almost surely) its best match
    scores, positions = search(queries, out, topk=4, use_gpu=False)
    run = run_from_hits(["q1", "q2"], scores, positions, corpus)
    assert list(run) == ["q1", "q2"]
    assert all(len(hits) == 4 for hits in run.values())
    assert max(run["q1"], key=run["q1"].get) == "p3" and max(run["q2"], key=run["q2"].get) == "p41"
    for qid, row in zip(run, range(2)):
        assert list(run[qid]) == [f"p{p}" for p in positions[row]]
        assert list(run[qid].values()) == pytest.approx(scores[row].tolist())


def test_search_requires_complete_index(tmp_path):
    with pytest.raises(ReprolibError, match="is not an index"):
        search(np.zeros((1, DIM), np.float32), tmp_path)


# ---------------------------------------------------------------- several processes

class FakeState:
    """One process of a `world`-process accelerate launch, run alone: the barrier returns at once."""

    def __init__(self, rank, world):
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0
        self.local_process_index = rank

    def wait_for_everyone(self):
        pass


def test_processes_split_shards_round_robin(corpus, tmp_path):
    out = tmp_path / "index"  # 53 passages in 6 shards of 10: process r of 3 encodes shards r and r + 3
    encoders = [FakeEncoder() for _ in range(3)]
    options = dict(shard_size=10, dtype="float32", progress=False)
    # Run one after the other, the barrier returns at once: the main process finds the others' shards missing
    with pytest.raises(ReprolibError, match=r"4 of 6 shards are missing .*\(shard_00001.npy, shard_00002.npy, "
                                            r"shard_00004.npy, shard_00005.npy\)"):
        encode_corpus(encoders[0], corpus, out, state=FakeState(0, 3), **options)
    for rank in (1, 2):
        assert not encode_corpus(encoders[rank], corpus, out, state=FakeState(rank, 3), **options)["complete"]
    meta = encode_corpus(encoders[0], corpus, out, state=FakeState(0, 3), **options)  # only the main marks it complete
    assert meta["complete"] and meta["dim"] == DIM and meta["num_shards"] == 6
    assert [e.calls for e in encoders] == [[10, 10], [10, 10], [10, 3]]
    np.testing.assert_array_equal(np.concatenate([np.load(shard_path(out, s)) for s in range(6)]), full_matrix(corpus))


def test_processes_split_an_exact_search_by_shards_and_the_main_one_gets_the_one_process_result(tmp_path,
                                                                                              monkeypatch):
    """Process r of 3 searches shards r and r + 3; gathered block by block of queries, the parts merge on the main
    process to one process's hits, ties included (each text appears in three shards, so equal scores cross
    every split); the other processes get nothing."""
    from reprolib import index

    source = tmp_path / "corpus.tsv"
    source.write_text("".join(f"p{i}\tt\ttopic {i % 9}\n" for i in range(53)))
    out = tmp_path / "index"
    encode_corpus(FakeEncoder(), Corpus.open(source, progress=False), out, shard_size=10, dtype="float32",
                  progress=False)
    queries = np.random.default_rng(1).standard_normal((5, DIM)).astype(np.float32)
    single = search(queries, out, topk=12, use_gpu=False)

    parts, blocks = {}, []
    monkeypatch.setattr(index, "_merge_processes", lambda hits, n, k, state: parts.setdefault(state.process_index, hits))
    for rank in range(3):
        search(queries, out, topk=12, use_gpu=False, state=FakeState(rank, 3))
    assert parts[0][0].shape == (5, 12) and not np.array_equal(parts[0][1], single[1])  # a part is not the whole
    monkeypatch.undo()

    def gather(part, state):   # the main process receives every process's block, in rank order
        blocks.append(part[0].shape[0])
        start = sum(blocks[:-1]) if state.is_main_process else 0
        return [(s[start:start + len(part[0])], p[start:start + len(part[0])]) for s, p in parts.values()] \
            if state.is_main_process else None

    monkeypatch.setattr(index, "_gather_to_main", gather)
    assert index._merge_processes(parts[1], 5, 12, FakeState(1, 3)) == (None, None)
    blocks.clear()
    scores, positions = index._merge_processes(parts[0], 5, 12, FakeState(0, 3), block=2)
    assert blocks == [2, 2, 1]
    np.testing.assert_array_equal(positions, single[1])
    np.testing.assert_array_equal(scores, single[0])
    assert (np.diff(single[0], axis=1) == 0).any()    # the ties are there


# ---------------------------------------------------------------- approximate indexes

ANN_NUM, ANN_DIM = 3000, 32


class RowEncoder:
    """Passage i (its title is "i") -> row i of a fixed matrix."""

    def __init__(self, matrix):
        self.matrix = matrix

    def encode_passages(self, passages, batch_size=64, max_length=None, progress=False, template=None):
        return self.matrix[[int(title) for title, _ in passages]]


def unit_rows(rng, n):
    x = rng.standard_normal((n, ANN_DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def random_index(tmp_path):
    """(index dir, query matrix): 3,000 random unit vectors in 4 shards, and 100 random unit queries."""
    faiss = pytest.importorskip("faiss")
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # small indexes: OpenMP threads only contend (badly, on a busy 2-core box)
    source = tmp_path / "corpus.tsv"
    source.write_text("".join(f"p{i}\t{i}\tx\n" for i in range(ANN_NUM)))
    rng = np.random.default_rng(0)
    out = tmp_path / "index"
    encode_corpus(RowEncoder(unit_rows(rng, ANN_NUM)), Corpus.open(source, progress=False), out, shard_size=800,
                  dtype="float32", progress=False)
    yield out, unit_rows(rng, 100)
    faiss.omp_set_num_threads(threads)


def recall_at_10(index_dir, queries, **options):
    _, exact = search(queries, index_dir, topk=10, use_gpu=False)
    _, approx = search(queries, index_dir, topk=10, **options)
    assert approx.shape == (len(queries), 10) and approx.dtype == np.int64
    return np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])


def test_hnsw_recall_and_reuse(random_index, monkeypatch):
    import faiss

    index_dir, queries = random_index
    assert recall_at_10(index_dir, queries, index_type="hnsw", hnsw_m=16, ef_search=64) >= 0.95
    saved = index_dir / "hnsw_M16_efc200.faiss"
    assert saved.exists() and not list(index_dir.glob("*.tmp"))
    first = search(queries, index_dir, topk=10, index_type="hnsw", hnsw_m=16)
    monkeypatch.setattr(faiss, "IndexHNSWFlat", None)  # a rebuild would fail: the saved file must be read
    again = search(queries, index_dir, topk=10, index_type="hnsw", hnsw_m=16)
    np.testing.assert_array_equal(again[1], first[1])
    np.testing.assert_array_equal(again[0], first[0])
    assert (np.diff(first[0], axis=1) <= 0).all()


def test_ivfpq_recall_and_reuse(random_index, monkeypatch):
    import faiss

    index_dir, queries = random_index
    # every list probed: what is left is the product quantizer's error (2 dims per one-byte code)
    options = dict(index_type="ivfpq", nlist=32, pq_m=16, nprobe=32)
    assert recall_at_10(index_dir, queries, **options) >= 0.7
    assert (index_dir / "ivfpq_nlist32_m16.faiss").exists()
    built = search(queries, index_dir, topk=10, **options)
    monkeypatch.setattr(faiss, "IndexIVFPQ", None)  # read back from the file, with nprobe set on it
    np.testing.assert_array_equal(search(queries, index_dir, topk=10, **options)[1], built[1])
    few = search(queries, index_dir, topk=10, **{**options, "nprobe": 1})[1]
    assert not np.array_equal(few, built[1])  # nprobe reaches the index read back
    with pytest.raises(ReprolibError, match="pq_m must divide"):
        search(queries, index_dir, topk=10, index_type="ivfpq", pq_m=5)


def test_reencoding_a_shard_drops_stale_ann_files(random_index):
    index_dir, queries = random_index
    search(queries, index_dir, topk=5, index_type="hnsw", hnsw_m=8)
    assert list(index_dir.glob("*.faiss"))
    shard_path(index_dir, 2).unlink()
    corpus = Corpus.open(index_dir.parent / "corpus.tsv", progress=False)
    matrix = unit_rows(np.random.default_rng(1), ANN_NUM)
    encode_corpus(RowEncoder(matrix), corpus, index_dir, shard_size=800, dtype="float32", progress=False)
    assert not list(index_dir.glob("*.faiss"))
    with pytest.raises(ReprolibError, match="unknown index type"):
        search(queries, index_dir, topk=5, index_type="ivf")
    with pytest.raises(ReprolibError, match="run on the CPU"):
        search(queries, index_dir, topk=5, index_type="hnsw", use_gpu=True)
