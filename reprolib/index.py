"""A sharded, resumable dense index on disk, and exact inner-product search over it.

`encode_corpus` writes

    out_dir/shard_00000.npy, shard_00001.npy, ...   (rows, dim) float16/float32, row r of shard s is
                                                    passage s * shard_size + r of the corpus
    out_dir/index.json                              num_passages, dim, dtype, shard_size, num_shards,
                                                    corpus store path, template, complete

Each shard is written atomically (temp file, then os.replace), so a shard that exists is complete;
re-running skips the shards already there. Only one shard of texts and embeddings is in memory.

`search` scores queries against one shard at a time with faiss IndexFlatIP (exact; on a GPU when
faiss has one) and keeps a running top-k, so memory is one shard plus (queries x k).
Passage ids are not stored in the index: positions map to ids through the corpus (`run_from_hits`).
"""
import json
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from reprolib.errors import ReprolibError
from reprolib.fileio import atomic_write

INDEX_FILE = "index.json"
DTYPES = ("float16", "float32")


def shard_path(index_dir, number):
    return Path(index_dir) / f"shard_{number:05d}.npy"


def _template_name(template):
    if template is None or isinstance(template, str):
        return template
    return repr(template)


def _write_json(path, data):
    with atomic_write(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _valid_shard(path, rows, dtype, dim):
    """True when `path` holds a (rows, dim) array of `dtype` (dim None: any width)."""
    if not path.exists():
        return False
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError):
        return False
    return (array.ndim == 2 and array.shape[0] == rows and array.dtype == np.dtype(dtype)
            and (dim is None or array.shape[1] == dim))


def encode_corpus(encoder, corpus, out_dir, shard_size=100_000, batch_size=64, template="plain", dtype="float16",
                  progress=True, max_length=None):
    """Encode every passage of `corpus` into shards under `out_dir`; returns the index metadata dict.

    Resumable: shards already present (right rows, dtype and width) are skipped. Re-running into a
    directory built with different settings (passages, shard size, dtype, template) is an error.
    """
    if dtype not in DTYPES:
        raise ReprolibError(f"index dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    shard_size = int(shard_size)
    if shard_size < 1:
        raise ReprolibError(f"shard_size must be positive, not {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_passages = len(corpus)
    num_shards = -(-num_passages // shard_size)
    store = getattr(corpus, "store_dir", None)
    meta = {"num_passages": num_passages, "dim": None, "dtype": dtype, "shard_size": shard_size,
            "num_shards": num_shards, "corpus_store": str(store) if store is not None else None,
            "template": _template_name(template), "complete": False}

    meta_path = out_dir / INDEX_FILE
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        for key in ("num_passages", "dtype", "shard_size", "template"):
            if old.get(key) != meta[key]:
                raise ReprolibError(f"{out_dir} holds an index with {key}={old.get(key)!r}, not {meta[key]!r}; "
                                    "use a fresh directory or delete it")
        meta["dim"] = old.get("dim")
    _write_json(meta_path, meta)  # records the settings before any shard, so a resume can check them

    dim = meta["dim"]
    for number in tqdm(range(num_shards), desc="encoding shards", unit=" shard", disable=not progress):
        start, end = number * shard_size, min((number + 1) * shard_size, num_passages)
        path = shard_path(out_dir, number)
        if _valid_shard(path, end - start, dtype, dim):
            dim = dim or int(np.load(path, mmap_mode="r").shape[1])
            continue
        items = [(corpus.title(i), corpus.text(i)) for i in range(start, end)]
        kwargs = {"batch_size": batch_size, "template": template, "progress": progress}
        if max_length is not None:
            kwargs["max_length"] = max_length
        embeddings = np.asarray(encoder.encode_passages(items, **kwargs))
        del items
        if embeddings.ndim != 2 or embeddings.shape[0] != end - start:
            raise ReprolibError(f"encoder returned shape {embeddings.shape} for {end - start} passages")
        if dim is not None and embeddings.shape[1] != dim:
            raise ReprolibError(f"encoder returned width {embeddings.shape[1]}, but the index has dim {dim}")
        dim = int(embeddings.shape[1])
        with atomic_write(path, "wb") as f:
            np.save(f, embeddings.astype(dtype, copy=False))
        del embeddings

    meta.update(dim=dim, complete=True)
    _write_json(meta_path, meta)
    return meta


def load_meta(index_dir):
    path = Path(index_dir) / INDEX_FILE
    if not path.exists():
        raise ReprolibError(f"{index_dir} is not a dense index (no {INDEX_FILE}); build it with encode_corpus")
    meta = json.loads(path.read_text())
    if not meta.get("complete"):
        raise ReprolibError(f"the index in {index_dir} is incomplete; re-run encode_corpus to finish it")
    return meta


def _gpu_resources(use_gpu):
    """faiss GPU resources when wanted and available, else None."""
    import faiss

    available = hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0
    if use_gpu == "auto":
        use_gpu = available
    if not use_gpu:
        return None
    if not available:
        raise ReprolibError("use_gpu=True but this faiss has no GPU support (or sees no GPU)")
    return faiss.StandardGpuResources()


def _merge_topk(scores, positions, new_scores, new_positions, k):
    """Top-k of the union of two (Q, *) candidate sets, sorted by score desc (ties: lower position)."""
    if scores is not None:
        new_scores = np.concatenate([scores, new_scores], axis=1)
        new_positions = np.concatenate([positions, new_positions], axis=1)
    if new_scores.shape[1] > k:
        keep = np.argpartition(-new_scores, k - 1, axis=1)[:, :k]
        new_scores = np.take_along_axis(new_scores, keep, axis=1)
        new_positions = np.take_along_axis(new_positions, keep, axis=1)
    order = np.lexsort((new_positions, -new_scores), axis=1)
    return np.take_along_axis(new_scores, order, axis=1), np.take_along_axis(new_positions, order, axis=1)


def search(query_embeddings, index_dir, topk=1000, use_gpu="auto", progress=False):
    """Exact inner-product top-k of every query over the sharded index.

    Returns (scores float32 [Q, k], positions int64 [Q, k]) sorted by descending score, where
    k = min(topk, number of passages) and positions are corpus row numbers.
    """
    import faiss

    meta = load_meta(index_dir)
    queries = np.ascontiguousarray(np.asarray(query_embeddings, dtype=np.float32))
    if queries.ndim != 2:
        raise ReprolibError(f"query embeddings must be 2-D, got shape {queries.shape}")
    dim, num_passages, shard_size = meta["dim"], meta["num_passages"], meta["shard_size"]
    k = min(int(topk), num_passages)
    if num_passages == 0 or k <= 0 or len(queries) == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    if queries.shape[1] != dim:
        raise ReprolibError(f"queries have dim {queries.shape[1]}, the index has dim {dim}")

    resources = _gpu_resources(use_gpu)
    scores = positions = None
    for number in tqdm(range(meta["num_shards"]), desc="searching shards", unit=" shard", disable=not progress):
        shard = np.ascontiguousarray(np.load(shard_path(index_dir, number)), dtype=np.float32)
        index = faiss.IndexFlatIP(dim)
        if resources is not None:
            index = faiss.index_cpu_to_gpu(resources, 0, index)
        index.add(shard)
        shard_k = min(k, len(shard))
        shard_scores, shard_positions = index.search(queries, shard_k)
        shard_positions = shard_positions.astype(np.int64) + number * shard_size
        del index, shard
        scores, positions = _merge_topk(scores, positions, shard_scores, shard_positions, k)
    return scores, positions


def run_from_hits(qids, scores, positions, corpus):
    """{qid: {pid: score}} from search() output; negative positions (no hit) are skipped."""
    qids = list(qids)
    if len(qids) != len(scores):
        raise ReprolibError(f"{len(qids)} query ids for {len(scores)} rows of hits")
    run = {}
    for qid, row_scores, row_positions in zip(qids, np.asarray(scores), np.asarray(positions)):
        valid = row_positions >= 0
        ids = corpus.ids[row_positions[valid]]
        run[qid] = {(pid.decode("utf-8") if isinstance(pid, bytes) else str(pid)): float(score)
                    for pid, score in zip(ids, row_scores[valid].tolist())}
    return run
