"""The synthetic dataset at MS MARCO's sizes, with every file a recipe reads at that scale.

`generate(out_dir, scale=1.0)` writes, in minutes and deterministically from `seed`:

    corpus.tsv, {train,dev}.query.txt, qrels.{train,dev}.tsv   the synthetic generator's, at MS MARCO's counts
    train.negatives.tsv        BM25-style negatives (qid \\t pid,pid,...), for 400,782 of the train queries
    train.mined.trec           a mined top-200 TREC run for every train query
    hard-negatives/train.ce_scores.pkl.gz   teacher scores as sentence-transformers publish them:
                               a pickled {qid int: {pid int: float}}, 318 passages per train query (~160M scores)
    hard-negatives/train.ce_scores.tsv      the same scores as `qid pid score` lines (reprolib's own format)
    hard-negatives/train.negatives.union.tsv  the teacher's scored passages minus the positives
    msmarco_scale.json         the counts and each file's writing time

It exists to rehearse the recipes' data paths at full size (bench/scale_rehearsal.py): memory and time, not
retrieval quality. The corpus, queries and one relevant passage per query are the synthetic generator's. The
rest is drawn from the generator's structure, not computed by a model: an entity's other passages and its
family's come first among the negatives and the teacher's high scores, then random passages. MS MARCO labels
1.06 passages per train query; to match its qrels row counts, a share of the queries also list a second
passage of the same entity as relevant, which carries no meaning for training.

`scale` < 1 shrinks every count in proportion (tests use 0.001: 8,842 passages, the same layout).
"""
import gzip
import json
import struct
import time
from pathlib import Path

import numpy as np

from reprolib.data import synthetic
from reprolib.errors import ReprolibError
from reprolib.fileio import atomic_write
from reprolib.progress import tqdm

# MS MARCO passage ranking (v1), as the recipes read it
PASSAGES = 8_841_823
TRAIN_QUERIES, TRAIN_QRELS_ROWS = 502_939, 532_761
DEV_QUERIES, DEV_QRELS_ROWS = 6_980, 7_437
NEGATIVES_LINES = 400_782        # queries with a line in the BM25 negatives file
NEGATIVES_DEPTH = 200            # BM25 top-200 minus the positives
MINED_DEPTH = 200
TEACHER_PER_QUERY = 318          # sentence-transformers' cross-encoder scores: ~160M over the train queries

FAMILY = synthetic.ENTITIES_PER_FAMILY * synthetic.PASSAGES_PER_ENTITY   # passages of one entity family
BLOCK = 2048                     # queries per vectorized block
_STREAM_EXTRA, _STREAM_NEGATIVES, _STREAM_MINED = 11, 12, 13


def counts(scale=1.0):
    """The file sizes at `scale` (1.0: MS MARCO's)."""
    if not 0 < scale <= 1:
        raise ReprolibError(f"scale must be in (0, 1], not {scale}")
    size = {name: max(1, round(value * scale)) for name, value in (
        ("passages", PASSAGES), ("train_queries", TRAIN_QUERIES), ("train_qrels_rows", TRAIN_QRELS_ROWS),
        ("dev_queries", DEV_QUERIES), ("dev_qrels_rows", DEV_QRELS_ROWS), ("negatives_lines", NEGATIVES_LINES))}
    size["passages"] = max(size["passages"], synthetic.MIN_PASSAGES)
    return size


def generate(out_dir, scale=1.0, seed=42, progress=True):
    """Write the files listed in the module docstring into `out_dir`; returns the stats written to
    msmarco_scale.json. Every file is written to a temporary name first, so a killed run leaves no half file."""
    out_dir = Path(out_dir)
    size = counts(scale)
    seconds = {}
    start = time.perf_counter()
    synthetic.generate(out_dir, num_passages=size["passages"], num_train_queries=size["train_queries"],
                       num_dev_queries=size["dev_queries"], seed=seed, progress=progress)
    seconds["synthetic"] = time.perf_counter() - start
    positives = {}
    for split in ("train", "dev"):
        t = time.perf_counter()
        qids, pids = _read_single_qrels(out_dir / f"qrels.{split}.tsv")
        extra = _second_positives(qids, pids, size[f"{split}_qrels_rows"] - len(qids), size["passages"], seed, split)
        _write_qrels(out_dir / f"qrels.{split}.tsv", qids, pids, extra)
        positives[split] = (qids, pids, extra)
        seconds[f"qrels.{split}"] = time.perf_counter() - t
    qids, pids, extra = positives["train"]
    writers = {
        "train.negatives.tsv": lambda path: _write_negatives(
            path, qids, pids, extra, size["passages"], seed, _negatives_subset(len(qids), size["negatives_lines"], seed),
            NEGATIVES_DEPTH, progress),
        "train.mined.trec": lambda path: _write_mined_run(path, qids, pids, size["passages"], seed, progress),
        "hard-negatives/train.ce_scores.pkl.gz": lambda path: _write_teacher(path, qids, pids, size["passages"], seed,
                                                                             "pickle", progress),
        "hard-negatives/train.ce_scores.tsv": lambda path: _write_teacher(path, qids, pids, size["passages"], seed,
                                                                          "text", progress),
        "hard-negatives/train.negatives.union.tsv": lambda path: _write_union(path, qids, pids, extra,
                                                                              size["passages"], seed, progress),
    }
    for name, write in writers.items():
        t = time.perf_counter()
        write(out_dir / name)
        seconds[name] = time.perf_counter() - t
    stats = {"seed": seed, "scale": scale, **size, "negatives_depth": NEGATIVES_DEPTH, "mined_depth": MINED_DEPTH,
             "teacher_scores": len(qids) * TEACHER_PER_QUERY,
             "seconds": {name: round(value, 1) for name, value in seconds.items()},
             "total_seconds": round(time.perf_counter() - start, 1)}
    with atomic_write(out_dir / "msmarco_scale.json") as f:
        json.dump(stats, f, indent=2)
    return stats


# ---- qrels ----------------------------------------------------------------------------------

def _read_single_qrels(path):
    """(qids, pids) int64 arrays of the generator's qrels: one relevant passage per query, in qid order."""
    table = np.loadtxt(path, dtype=np.int64, usecols=(0, 2), ndmin=2)
    return table[:, 0], table[:, 1]


def _second_positives(qids, pids, rows, num_passages, seed, split):
    """{query row: a second relevant pid} for `rows` queries: a neighbour passage of the same entity."""
    rng = np.random.default_rng([seed, _STREAM_EXTRA, split == "dev"])
    neighbour = pids ^ 1                              # the other passage of the entity's pair (0-1, 2-3)
    eligible = np.flatnonzero(neighbour < num_passages)
    chosen = np.sort(rng.choice(eligible, size=min(max(rows, 0), len(eligible)), replace=False))
    return dict(zip(chosen.tolist(), neighbour[chosen].tolist()))


def _write_qrels(path, qids, pids, extra):
    with atomic_write(path) as f:
        for row, (qid, pid) in enumerate(zip(qids.tolist(), pids.tolist())):
            f.write(f"{qid}\t0\t{pid}\t1\n")
            if row in extra:
                f.write(f"{qid}\t0\t{extra[row]}\t1\n")


# ---- candidates: an entity's passages, then its family's, then random ones --------------------

def _candidates(pids, extra_rows, num_passages, depth, rng):
    """[B, depth] int64 candidates per query (positives excluded, no repeats): the entity's and its family's
    other passages first, the rest random passages outside the family."""
    family_start = (pids // FAMILY) * FAMILY
    family = family_start[:, None] + np.arange(FAMILY)
    out = np.empty((len(pids), depth), np.int64)
    outside = num_passages - FAMILY
    for i in range(len(pids)):
        near = family[i][(family[i] < num_passages) & (family[i] != pids[i]) & (family[i] != extra_rows.get(i, -1))]
        near = near[:depth]
        # random passages outside the family window [start, start + FAMILY), none twice
        far = (family_start[i] + FAMILY + rng.choice(outside, size=depth - len(near), replace=False)) % num_passages
        out[i, :len(near)], out[i, len(near):] = near, far
    return out


def _blocks(qids, progress, what):
    with tqdm(total=len(qids), desc=what, unit=" query", disable=not progress) as bar:
        for start in range(0, len(qids), BLOCK):
            yield start, min(start + BLOCK, len(qids))
            bar.update(min(BLOCK, len(qids) - start))


def _block_rng(seed, stream, start):
    return np.random.default_rng([seed, _STREAM_NEGATIVES, stream, start])


def _negatives_subset(num_queries, lines, seed):
    rng = np.random.default_rng([seed, _STREAM_NEGATIVES, 0])
    return np.sort(rng.choice(num_queries, size=min(lines, num_queries), replace=False))


def _write_negatives(path, qids, pids, extra, num_passages, seed, rows, depth, progress):
    """`qid \\t pid,pid,...` for the query rows in `rows`: `depth` candidates minus every positive."""
    wanted = np.zeros(len(qids), bool)
    wanted[rows] = True
    with atomic_write(path) as f:
        for start, end in _blocks(qids, progress, path.name):
            local_extra = {r - start: p for r, p in extra.items() if start <= r < end}
            block = _candidates(pids[start:end], local_extra, num_passages, depth, _block_rng(seed, depth, start))
            f.write("".join(f"{qid}\t{','.join(map(str, row))}\n"
                            for qid, row, keep in zip(qids[start:end].tolist(), block.tolist(), wanted[start:end])
                            if keep))


def _write_union(path, qids, pids, extra, num_passages, seed, progress):
    """The passages the teacher scored, minus every positive (as sentence-transformers' union negatives are)."""
    with atomic_write(path) as f:
        for start, end in _blocks(qids, progress, path.name):
            scored, _ = _teacher_block(pids, num_passages, seed, start, end)
            f.write("".join(f"{qid}\t{','.join(str(p) for p in row if p != extra.get(row_number, -1))}\n"
                            for row_number, qid, row in zip(range(start, end), qids[start:end].tolist(),
                                                            scored[:, 1:].tolist())))


def _teacher_block(pids, num_passages, seed, start, end):
    """(pids [B, TEACHER_PER_QUERY], scores) of one block: the positive first, scored high; the entity's and
    family's passages next, in between; random passages low."""
    rng = _block_rng(seed, TEACHER_PER_QUERY, start)
    others = _candidates(pids[start:end], {}, num_passages, TEACHER_PER_QUERY - 1, rng)
    scored = np.concatenate([pids[start:end, None], others], axis=1)
    level = np.full(scored.shape, -6.0)
    level[:, 0] = 8.0
    level[:, 1:FAMILY] = 2.0
    return scored, (level + rng.normal(0, 1.5, scored.shape)).round(4)


def _write_teacher(path, qids, pids, num_passages, seed, kind, progress):
    """The teacher's scores as the sentence-transformers pickle (streamed opcode by opcode: the table is never
    in memory) or as `qid \t pid \t score` lines. Both hold the same numbers."""
    with atomic_write(path, mode="wb") as raw:
        f = gzip.GzipFile(filename=path.name[:-3], fileobj=raw, mode="wb", compresslevel=1, mtime=0) \
            if kind == "pickle" else raw
        if kind == "pickle":
            f.write(b"\x80\x02}")                              # PROTO 2, EMPTY_DICT: the outer {qid: ...}
        for start, end in _blocks(qids, progress, path.name):
            scored, scores = _teacher_block(pids, num_passages, seed, start, end)
            if kind == "pickle":
                f.write(_pickled_rows(qids[start:end], scored, scores))
            else:
                f.write("".join(f"{qid}\t{pid}\t{score:.4f}\n" for qid, row, values in
                                zip(qids[start:end].tolist(), scored.tolist(), scores.tolist())
                                for pid, score in zip(row, values)).encode())
        if kind == "pickle":
            f.write(b".")                                      # STOP
            f.close()


def _write_mined_run(path, qids, pids, num_passages, seed, progress):
    """A student's top MINED_DEPTH of the teacher's passages (the teacher's scores plus noise), as a TREC run."""
    with atomic_write(path) as f:
        for start, end in _blocks(qids, progress, path.name):
            scored, scores = _teacher_block(pids, num_passages, seed, start, end)
            student = scores + np.random.default_rng([seed, _STREAM_MINED, start]).normal(0, 4.0, scores.shape)
            order = np.argsort(-student, axis=1, kind="stable")[:, :MINED_DEPTH]
            ranked, values = np.take_along_axis(scored, order, 1), np.take_along_axis(student, order, 1)
            f.write("".join(f"{qid} Q0 {pid} {rank} {score:.4f} mined\n" for qid, row, row_scores in
                            zip(qids[start:end].tolist(), ranked.tolist(), values.tolist())
                            for rank, (pid, score) in enumerate(zip(row, row_scores), 1)))


_ITEM = np.dtype([("int_op", "S1"), ("pid", "<i4"), ("float_op", "S1"), ("score", ">f8")])


def _pickled_rows(qids, scored, scores):
    """Pickle opcodes adding {qid: {pid: score, ...}} for each row to the dict on the stack: MARK, then per
    query BININT qid, EMPTY_DICT, MARK, (BININT pid, BINFLOAT score)..., SETITEMS; then SETITEMS."""
    items = np.empty(scored.shape, _ITEM)
    items["int_op"], items["pid"], items["float_op"], items["score"] = b"J", scored, b"G", scores
    parts = [b"("]
    for qid, row in zip(qids.tolist(), items):
        parts += [b"J", struct.pack("<i", qid), b"}(", row.tobytes(), b"u"]
    parts.append(b"u")
    return b"".join(parts)
