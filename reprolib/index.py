"""A sharded, resumable index on disk (dense vectors or sparse lexicon weights), and exact search over it.

`encode_corpus` writes

    out_dir/shard_00000.npy, shard_00001.npy, ...   (rows, dim) float16/float32, row r of shard s is
                                                    passage s * shard_size + r of the corpus
    out_dir/index.json                              kind, num_passages, dim, dtype, shard_size, num_shards,
                                                    corpus store path, template, complete, and what the
                                                    vectors are of: the corpus and model fingerprints, the
                                                    passage max length and the autocast precision

A sparse encoder (kind "sparse", reprolib.modeling.sparse) writes shard_00000.npz, ... instead: scipy CSR
matrices (rows, vocabulary size) of float32 weights (scipy.sparse.save_npz), and index.json adds how many
non-zero weights the passages have. `search_sparse` scores them exactly, as float dot products or as
Anserini's quantized impact scores.

Each shard is written atomically (temp file, then os.replace), so a shard that exists is complete;
re-running skips the shards already there. Only one shard of texts and embeddings is in memory.
Under `accelerate launch`, process r of W encodes the shards whose number % W == r on its own
device; the main process writes index.json and, once every process is done, marks it complete.

`search` with index_type="flat" scores queries against one shard at a time with faiss IndexFlatIP
(exact; on the GPUs when faiss has them) and keeps a running top-k, so memory is one shard plus
(queries x k). "hnsw" (IndexHNSWFlat) and "ivfpq" (IndexIVFPQ) are approximate CPU indexes, built
once from the shards into out_dir/<type>_<build params>.faiss and reused by later searches;
re-encoding a shard deletes them. Passage ids are not stored in the index: positions map to ids
through the corpus (`run_from_hits`).
"""
import hashlib
import json
import logging
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse
from reprolib.progress import tqdm

from reprolib.cpu import openblas_kernels_named
from reprolib.errors import ReprolibError
from reprolib.fileio import atomic_write

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
DTYPES = ("float16", "float32")
# what the vectors of an index depend on beyond its shape: a change re-encodes every shard
VECTORS_OF = (("corpus_fingerprint", "corpus"), ("model_fingerprint", "model"),
              ("passage_max_len", "passage max length"), ("precision", "precision"))
INDEX_TYPES = ("flat", "hnsw", "ivfpq")
HNSW_EF_CONSTRUCTION = 200  # build-time beam width: wider than faiss's 40, a better graph for a slower build
PQ_BITS = 8                 # one byte per sub-vector code, the setting every faiss PQ kernel supports
IVF_TRAIN_PER_LIST = 64     # k-means sample per inverted list (faiss asks for 39 to 256)
PQ_MIN_TRAIN = 39 * 2**PQ_BITS  # ... and 39 points per PQ centroid
GPU_MAX_K = 2048            # faiss GPU indexes return at most this many neighbours


def shard_path(index_dir, number, kind="dense"):
    return Path(index_dir) / f"shard_{number:05d}.{'npz' if kind == 'sparse' else 'npy'}"


def _template_name(template):
    if template is None or isinstance(template, str):
        return template
    return repr(template)


def _write_json(path, data):
    with atomic_write(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _shard_info(path):
    """(rows, width, dtype) of a shard file, or None when it is missing or unreadable. Sparse shards are
    float32 (the only type written); their shape is read without loading the matrix."""
    if not path.exists():
        return None
    try:
        if path.suffix == ".npz":
            with np.load(path) as f:  # the entries of scipy's save_npz, each read on access
                rows, width = f["shape"]
            return int(rows), int(width), np.dtype("float32")
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile):
        return None
    return (*array.shape, array.dtype) if array.ndim == 2 else None


def _shard_rows(meta, number):
    """How many passages shard `number` of an index holds."""
    return min(meta["shard_size"], meta["num_passages"] - number * meta["shard_size"])


def _valid_shard(path, rows, dtype, dim, finite=True):
    """True when `path` holds a (rows, dim) matrix of `dtype` (dim None: any width), of finite numbers unless
    `finite` is False (shards this run wrote were checked in memory: reading them back would cost a full pass)."""
    info = _shard_info(path)
    if info is None or info[0] != rows or info[2] != np.dtype(dtype) or dim not in (None, info[1]):
        return False
    if not finite:
        return True
    if path.suffix == ".npz":
        with np.load(path) as f:
            return bool(np.isfinite(f["data"]).all())
    shard = np.load(path, mmap_mode="r")
    return all(np.isfinite(shard[i:i + 65536]).all() for i in range(0, rows, 65536))


def model_fingerprint(encoder):
    """A digest of the encoder's weights and settings (its `config_dict`: pooling, max lengths, ...), for the same
    weights encode or score otherwise under other settings: an index, or a file of scores, is bound to the model
    that wrote it (None for an encoder that is not a torch module)."""
    import torch

    if not isinstance(encoder, torch.nn.Module):
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if hasattr(encoder, "config_dict"):
        digest.update(json.dumps(encoder.config_dict(), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _save_shard(path, vectors, dtype):
    with atomic_write(path, "wb") as f:
        if scipy.sparse.issparse(vectors):
            scipy.sparse.save_npz(f, scipy.sparse.csr_matrix(vectors, dtype=np.float32), compressed=False)
        else:
            np.save(f, vectors.astype(dtype, copy=False))


def encode_corpus(encoder, corpus, out_dir, shard_size=100_000, batch_size=64, template="plain", dtype=None,
                  progress=True, max_length=None, state=None):
    """Encode every passage of `corpus` into shards under `out_dir`; returns the index metadata dict.

    The encoder's `kind` ("dense" when it has none) decides the shards: dense vectors stored as `dtype`
    (default float16), or sparse CSR weights (float32 only). Resumable: shards already present (right
    rows, dtype and width) are skipped. Re-running into a directory built with different settings
    (kind, passages, shard size, dtype, template) is an error.
    `state` (default: `process_state()`) gives process_index, num_processes, is_main_process
    and wait_for_everyone(); this process encodes the shards number % num_processes == process_index
    with `encoder`, which the caller has put on this process's device.
    """
    from reprolib.modeling.encoder import autocast_precision

    kind = getattr(encoder, "kind", "dense")
    dtype = dtype or ("float32" if kind == "sparse" else "float16")
    if dtype not in DTYPES:
        raise ReprolibError(f"index dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if kind == "sparse" and dtype != "float32":
        raise ReprolibError(f"a sparse index stores float32 weights, not {dtype}")
    shard_size = int(shard_size)
    if shard_size < 1:
        raise ReprolibError(f"shard_size must be positive, not {shard_size}")
    state = state or process_state()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_passages = len(corpus)
    num_shards = -(-num_passages // shard_size)
    store = getattr(corpus, "store_dir", None)
    meta = {"kind": kind, "num_passages": num_passages, "dim": None, "dtype": dtype, "shard_size": shard_size,
            "num_shards": num_shards, "corpus_store": str(store) if store is not None else None,
            "corpus_fingerprint": getattr(corpus, "fingerprint", None), "model_fingerprint": model_fingerprint(encoder),
            "passage_max_len": max_length or getattr(encoder, "passage_max_len", None),
            "precision": autocast_precision(getattr(encoder, "device", "cpu")),
            "template": _template_name(template), "complete": False}

    meta_path = out_dir / INDEX_FILE
    if meta_path.exists():  # every process checks, so none writes shards into a mismatched index
        old = {"kind": "dense", **_read_meta(meta_path)}  # indexes from before sparse ones are dense
        for key in ("kind", "num_passages", "dtype", "shard_size", "template"):
            if old.get(key) != meta[key]:
                raise ReprolibError(f"{out_dir} holds an index with {key}={old.get(key)!r}, not {meta[key]!r}; "
                                    "use a fresh directory or delete it")
        old.setdefault("precision", "no")   # recorded since 2026-12-06; before, nearly every index was float32
        moved = [what for key, what in VECTORS_OF if key in old and old[key] != meta[key]]
        unknown = [what for key, what in VECTORS_OF if key not in old and meta[key] is not None]
        if moved or unknown:   # same shape, other content: the old shards would pass every check and be wrong
            why = []
            if moved:
                why.append(f"the {' and the '.join(moved)} changed since its shards were written")
            if unknown:
                why.append(f"its shards were written before the {' and the '.join(unknown)} was recorded")
            logger.warning("%s: %s; encoding every shard again", out_dir, "; ".join(why))
            state.wait_for_everyone()   # every process has compared before the main one removes the shards
            if state.is_main_process:
                for number in range(old.get("num_shards", 0)):
                    shard_path(out_dir, number, kind).unlink(missing_ok=True)
                _remove_ann_files(out_dir)
        else:
            meta["dim"] = old.get("dim")
    if state.is_main_process:
        _write_json(meta_path, meta)  # records the settings before any shard, so a resume can check them
    state.wait_for_everyone()   # no process reads shards the main process is still removing

    dim = meta["dim"]
    mine = range(state.process_index, num_shards, state.num_processes)
    stale_ann = True
    for number in tqdm(mine, desc="encoding shards", unit=" shard", disable=not (progress and state.is_main_process)):
        start, end = number * shard_size, min((number + 1) * shard_size, num_passages)
        path = shard_path(out_dir, number, kind)
        if _valid_shard(path, end - start, dtype, dim):
            dim = dim or _shard_info(path)[1]
            continue
        if stale_ann:  # approximate indexes built from the old shards would be wrong now
            _remove_ann_files(out_dir)
            stale_ann = False
        items = [(corpus.title(i), corpus.text(i)) for i in range(start, end)]
        kwargs = {"batch_size": batch_size, "template": template, "progress": progress and state.is_main_process}
        if max_length is not None:
            kwargs["max_length"] = max_length
        vectors = encoder.encode_passages(items, **kwargs)
        del items
        if not scipy.sparse.issparse(vectors):
            vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] != end - start:
            raise ReprolibError(f"encoder returned shape {vectors.shape} for {end - start} passages")
        if dim is not None and vectors.shape[1] != dim:
            raise ReprolibError(f"encoder returned width {vectors.shape[1]}, but the index has dim {dim}")
        dim = int(vectors.shape[1])
        values = vectors.data if scipy.sparse.issparse(vectors) else vectors
        if not np.isfinite(values).all():   # fp16 overflow, a broken model: never a shard that looks complete
            raise ReprolibError(f"the encoder returned NaN or infinite values for passages {start}-{end - 1}")
        _save_shard(path, vectors, dtype)
        del vectors

    state.wait_for_everyone()  # every process has written its shards
    if state.is_main_process:
        meta.update(dim=_check_shards(out_dir, meta, dim), complete=True)
        if kind == "sparse":
            nonzeros = _nonzeros(out_dir, meta)
            meta.update(nonzeros_total=int(nonzeros.sum()), nonzeros_per_passage=_summary(nonzeros))
        _write_json(meta_path, meta)
    state.wait_for_everyone()  # no process returns before the index is marked complete
    return json.loads(meta_path.read_text())


def process_state():
    """accelerate's PartialState: this process's rank, the world size and a barrier (one process unless
    started by `accelerate launch`). Without CUDA, a multi-process launch runs on the CPU over gloo,
    which PartialState only does when told cpu=True (as `accelerate launch --cpu` would tell it)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (launched and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def _check_shards(out_dir, meta, dim):
    """The index width, after checking that every shard is on disk with the right rows, dtype and width."""
    missing = []
    for number in range(meta["num_shards"]):
        path = shard_path(out_dir, number, meta["kind"])
        rows = _shard_rows(meta, number)
        if dim is None and _valid_shard(path, rows, meta["dtype"], None, finite=False):
            dim = _shard_info(path)[1]  # this process encoded no shard: take the width from another's
        if not _valid_shard(path, rows, meta["dtype"], dim, finite=False):
            missing.append(number)
    if missing:
        shown = ", ".join(str(shard_path(out_dir, n, meta["kind"]).name) for n in missing[:5])
        raise ReprolibError(f"{len(missing)} of {meta['num_shards']} shards are missing or invalid after encoding "
                            f"({shown}{', ...' if len(missing) > 5 else ''}); did another process fail? "
                            "Re-run to encode them")
    return dim


def _read_meta(path):
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReprolibError(f"{path}: not valid JSON ({e}); the index is damaged: delete it and encode again") from None
    if not isinstance(meta, dict):
        raise ReprolibError(f"{path}: not an index description; delete the index and encode again")
    return meta


def load_meta(index_dir):
    """index.json of a complete index; `kind` is "dense" for indexes written before sparse ones existed."""
    path = Path(index_dir) / INDEX_FILE
    if not path.exists():
        raise ReprolibError(f"{index_dir} is not an index (no {INDEX_FILE}); build it with `reprolib encode`")
    meta = {"kind": "dense", **_read_meta(path)}
    if not meta.get("complete"):
        raise ReprolibError(f"the index in {index_dir} is incomplete; re-run `reprolib encode` to finish it")
    return meta


def require_faiss():
    """The faiss module, or a one-line error saying how to install it (an extra, so that conda's faiss-gpu is
    not shadowed by pip's CPU build)."""
    try:
        with openblas_kernels_named():   # faiss's own OpenBLAS chooses its kernels as it loads
            import faiss
    except ImportError:
        raise ReprolibError("dense search needs faiss, which is not installed: pip install 'reprolib[faiss]' "
                            "(CPU), or conda install -c conda-forge faiss-gpu") from None
    return faiss


def faiss_sees_gpus():
    """Whether this faiss is built with GPU support and sees a GPU: what `use_gpu="auto"` searches on."""
    faiss = require_faiss()
    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def _gpu_resources(use_gpu, device=None):
    """{GPU number: faiss StandardGpuResources} for every visible GPU (only `device` when given: one process
    per GPU) when wanted and available, else None."""
    faiss = require_faiss()
    available = faiss_sees_gpus()
    if use_gpu == "auto":
        use_gpu = available
    if not use_gpu:
        return None
    if not available:
        raise ReprolibError("use_gpu=True but this faiss has no GPU support (or sees no GPU)")
    gpus = range(faiss.get_num_gpus()) if device is None else [device]
    return {gpu: faiss.StandardGpuResources() for gpu in gpus}


def _flat_index(dim, resources, fp16):
    """An empty exact inner-product index: on the CPU, or split over the GPUs of `resources`."""
    faiss = require_faiss()

    index = faiss.IndexFlatIP(dim)
    if resources is None:
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True       # each GPU holds a slice of the vectors (a single GPU: a plain GpuIndexFlatIP)
    options.useFloat16 = fp16  # RetroMAE's setting: vectors stored in fp16, half the GPU memory
    return faiss.index_cpu_to_gpu_multiple_py(list(resources.values()), index, options, gpus=list(resources))


def top_k(scores, k, positions=None):
    """(scores, positions) of each row's k best entries of `scores` [Q, M], sorted by score descending, ties
    to the lower position; `positions` [Q, M] name the entries (None: their column numbers).

    argpartition finds the k best in O(M) but cuts a run of equal scores anywhere; the rows where such a
    run crosses the cut are re-picked, so that the result does not depend on how candidates were split
    into shards or query blocks.
    """
    width = scores.shape[1]
    if width > k:
        keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(scores, keep, axis=1).min(axis=1)
        for r in np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > k):
            above = np.flatnonzero(scores[r] > kth[r])
            tied = np.flatnonzero(scores[r] == kth[r])
            if positions is not None:
                tied = tied[np.argsort(positions[r, tied], kind="stable")]
            keep[r] = np.concatenate([above, tied[:k - len(above)]])
    else:
        keep = np.broadcast_to(np.arange(width), scores.shape)
    top = np.take_along_axis(scores, keep, axis=1)
    where = keep if positions is None else np.take_along_axis(positions, keep, axis=1)
    order = np.lexsort((where, -top), axis=1)
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(where, order, axis=1)


def _merge_topk(scores, positions, new_scores, new_positions, k):
    """Top-k of the union of two (Q, *) candidate sets, sorted by score desc (ties: lower position)."""
    if scores is not None:
        new_scores = np.concatenate([scores, new_scores], axis=1)
        new_positions = np.concatenate([positions, new_positions], axis=1)
    return top_k(new_scores, k, new_positions)


def search(query_embeddings, index_dir, topk=1000, index_type="flat", use_gpu="auto", gpu_fp16=False, progress=False,
           hnsw_m=32, ef_search=128, nlist=None, pq_m=None, nprobe=32, state=None):
    """Inner-product top-k of every query over the index.

    index_type "flat" is exact: shard by shard, on the GPUs when faiss has them (`use_gpu` "auto", True
    or False), storing the vectors there in fp16 when `gpu_fp16`. Only one shard is in memory at a time, so
    an index may be larger than the GPUs' (or the host's) memory. Under `accelerate launch` (`state`: see
    `process_state`; every process calls this with the same queries), process r searches the shards
    number % num_processes == r on its own GPU, and the main process returns the merged result, the same as
    one process's; the others return (None, None). "hnsw" (`hnsw_m` links per node,
    `ef_search` beam width) and "ivfpq" (`nlist` lists, `pq_m` sub-vectors, `nprobe` lists visited)
    are approximate CPU indexes, built and saved on first use (`ann_index`).
    Returns (scores float32 [Q, k], positions int64 [Q, k]) sorted by descending score, where
    k = min(topk, number of passages) and positions are corpus row numbers (-1 where an approximate
    index found fewer than k).
    """
    if index_type not in INDEX_TYPES:
        raise ReprolibError(f"unknown index type {index_type!r}; choose from {', '.join(INDEX_TYPES)}")
    meta = load_meta(index_dir)
    if meta["kind"] != "dense":
        raise ReprolibError(f"{index_dir} is a {meta['kind']} index; search it with search_sparse")
    queries = np.ascontiguousarray(np.asarray(query_embeddings, dtype=np.float32))
    if queries.ndim != 2:
        raise ReprolibError(f"query embeddings must be 2-D, got shape {queries.shape}")
    dim, num_passages = meta["dim"], meta["num_passages"]
    k = min(int(topk), num_passages)
    if num_passages == 0 or k <= 0 or len(queries) == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    if queries.shape[1] != dim:
        raise ReprolibError(f"queries have dim {queries.shape[1]}, the index has dim {dim}")
    if index_type == "flat":
        if state is None or state.num_processes == 1:
            return _flat_search(queries, index_dir, meta, k, _gpu_resources(use_gpu), gpu_fp16, progress)
        mine = range(state.process_index, meta["num_shards"], state.num_processes)
        resources = _gpu_resources(use_gpu, device=state.local_process_index)
        hits = _flat_search(queries, index_dir, meta, k, resources, gpu_fp16, progress, mine)
        return _merge_processes(hits, len(queries), k, state)
    if use_gpu is True:
        raise ReprolibError(f"{index_type} indexes run on the CPU here; use index_type='flat' for a GPU search")

    index = ann_index(index_dir, index_type, hnsw_m=hnsw_m, nlist=nlist, pq_m=pq_m, progress=progress)
    if index_type == "hnsw":
        index.hnsw.efSearch = max(int(ef_search), k)  # the beam must hold k results
    else:
        index.nprobe = min(int(nprobe), index.nlist)
    scores, positions = index.search(queries, k)
    return scores, positions.astype(np.int64)


def _flat_search(queries, index_dir, meta, k, resources, gpu_fp16, progress, shards=None):
    """Exact search shard by shard (every shard, or the numbers in `shards`), merging each shard's top-k into a
    running top-k; (None, None) for no shards."""
    if resources is not None and k > GPU_MAX_K:
        raise ReprolibError(f"a faiss GPU search returns at most {GPU_MAX_K} hits per query, not {k}; "
                            "lower topk or use use_gpu=False")
    index = _flat_index(meta["dim"], resources, gpu_fp16)
    scores = positions = None
    shards = range(meta["num_shards"]) if shards is None else shards
    for number in tqdm(shards, desc="searching shards", unit=" shard", disable=not progress):
        index.add(_load_shard(index_dir, meta, number))
        shard_scores, shard_positions = index.search(queries, min(k, index.ntotal))
        shard_positions = shard_positions.astype(np.int64) + number * meta["shard_size"]
        index.reset()
        scores, positions = _merge_topk(scores, positions, shard_scores, shard_positions, k)
    return scores, positions


def _merge_processes(hits, num_queries, k, state, block=20_000):
    """Every process's (scores, positions) merged into one top-k on the main process, block by block of queries,
    so that the main process holds one block of every process's hits at a time, not all of them (mining: 500k
    queries x 200 hits per process). The other processes get (None, None). The ties rule of `top_k` makes the
    result independent of how the shards were split."""
    scores, positions = hits
    merged = []
    for start in range(0, num_queries, block):
        part = None if scores is None else (scores[start:start + block], positions[start:start + block])
        parts = _gather_to_main(part, state)
        if state.is_main_process:
            block_scores = block_positions = None
            for part in parts:     # in rank order
                if part is not None:
                    block_scores, block_positions = _merge_topk(block_scores, block_positions, *part, k)
            merged.append((block_scores, block_positions))
    if not state.is_main_process:
        return None, None
    return np.concatenate([s for s, _ in merged]), np.concatenate([p for _, p in merged])


def _gather_to_main(obj, state):
    """[each process's `obj`] on the main process (None elsewhere): torch.distributed's gather of objects."""
    import torch.distributed as dist

    parts = [None] * state.num_processes if state.is_main_process else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def _load_shard(index_dir, meta, number, rows=None):
    """Shard `number` (or its `rows`) as a C-contiguous float32 array, as faiss wants it."""
    path = shard_path(index_dir, number)
    try:
        shard = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise ReprolibError(f"{path}: cannot read the shard ({e}); the index is damaged: re-run `reprolib encode`") from None
    expected = _shard_rows(meta, number)
    if shard.ndim != 2 or shard.shape[0] != expected:
        raise ReprolibError(f"{path}: {shard.shape[0] if shard.ndim else 0} rows, but {INDEX_FILE} promises {expected}; "
                            "the index is damaged: re-run `reprolib encode`")
    return np.ascontiguousarray(shard if rows is None else shard[rows], dtype=np.float32)


# ---------------------------------------------------------------------- approximate indexes
def ann_index(index_dir, index_type="hnsw", hnsw_m=32, nlist=None, pq_m=None, progress=True):
    """The approximate (`hnsw` or `ivfpq`) faiss index over a complete dense index.

    Read from its file in `index_dir` when a search built it before, else built from the shards
    (one in memory at a time, besides the index) and saved there atomically. The file name holds the
    build parameters, so other parameters build another file. IVF-PQ defaults: nlist = 4 sqrt(N)
    (at most N / 39, so k-means has data for every list), pq_m = the largest divisor of dim up to dim / 4.
    """
    faiss = require_faiss()

    meta = load_meta(index_dir)
    if meta["num_passages"] == 0:
        raise ReprolibError(f"the index in {index_dir} is empty")
    if index_type == "hnsw":
        hnsw_m = int(hnsw_m)
        if hnsw_m < 2:
            raise ReprolibError(f"hnsw_m must be at least 2, not {hnsw_m}")
        path = Path(index_dir) / f"hnsw_M{hnsw_m}_efc{HNSW_EF_CONSTRUCTION}.faiss"
    elif index_type == "ivfpq":
        nlist, pq_m = _ivfpq_sizes(meta, nlist, pq_m)
        path = Path(index_dir) / f"ivfpq_nlist{nlist}_m{pq_m}.faiss"
    else:
        raise ReprolibError(f"unknown approximate index type {index_type!r}; choose from hnsw, ivfpq")
    if path.exists():
        return faiss.read_index(str(path))

    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(meta["dim"], hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    else:
        quantizer = faiss.IndexFlatIP(meta["dim"])
        index = faiss.IndexIVFPQ(quantizer, meta["dim"], nlist, pq_m, PQ_BITS, faiss.METRIC_INNER_PRODUCT)
        index.train(_training_sample(index_dir, meta, max(IVF_TRAIN_PER_LIST * nlist, PQ_MIN_TRAIN)))
    for number in tqdm(range(meta["num_shards"]), desc=f"building {path.name}", unit=" shard", disable=not progress):
        index.add(_load_shard(index_dir, meta, number))  # ids 0..N-1 in shard order: ids are corpus positions
    with atomic_write(path, "wb") as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
    return index


def _ivfpq_sizes(meta, nlist, pq_m):
    num_passages, dim = meta["num_passages"], meta["dim"]
    if nlist is None:
        nlist = max(1, min(round(4 * math.sqrt(num_passages)), num_passages // 39))
    if pq_m is None:
        pq_m = max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)
    nlist, pq_m = int(nlist), int(pq_m)
    if not 1 <= nlist <= num_passages:
        raise ReprolibError(f"nlist must be between 1 and the number of passages ({num_passages}), not {nlist}")
    if pq_m < 1 or dim % pq_m:
        raise ReprolibError(f"pq_m must divide the index dim {dim}, not {pq_m}")
    return nlist, pq_m


def _training_sample(index_dir, meta, size):
    """`size` random rows (all rows for a small index) of the shards, float32, read shard by shard."""
    num_passages, shard_size = meta["num_passages"], meta["shard_size"]
    rows = np.sort(np.random.default_rng(0).choice(num_passages, min(size, num_passages), replace=False))
    parts = []
    for number in range(meta["num_shards"]):
        lo, hi = np.searchsorted(rows, [number * shard_size, (number + 1) * shard_size])
        if hi > lo:
            parts.append(_load_shard(index_dir, meta, number, rows[lo:hi] - number * shard_size))
    return np.concatenate(parts)


def _remove_ann_files(index_dir):
    for path in Path(index_dir).glob("*.faiss"):
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------- sparse indexes
SCORE_BLOCK = 2**23       # query x passage scores computed at once (64 MiB of float64): bounds search memory
IMPACT_SCALE = 100        # LexMAE's quantization factor: weight w becomes the integer impact round(100 w)


def impact_weights(weights):
    """Anserini's impacts of a sparse matrix of weights: round(100 w) (half to even, as Python's round), zeros
    dropped. Kept as float64, whose sums of integers are exact below 2**53 and take scipy's fast path."""
    impacts = scipy.sparse.csr_matrix(weights, dtype=np.float64, copy=True)
    impacts.data = np.rint(impacts.data * IMPACT_SCALE)
    impacts.eliminate_zeros()
    return impacts


def _search_weights(weights, quantize):
    """What a sparse search multiplies: the float32 weights as stored, or their integer impacts."""
    return impact_weights(weights) if quantize else scipy.sparse.csr_matrix(weights, dtype=np.float32)


def search_sparse(queries, index_dir, topk=1000, quantize=False, progress=False):
    """Exact top-k dot products of sparse query vectors (a scipy matrix [Q, V], e.g. from
    SparseEncoder.encode_queries) with a sparse index.

    quantize=False scores the float32 weights as stored; True scores as Anserini's impact search
    does (docs/recipes.md §4.4): the integer dot product of round(100 w) of query and passage weights. Each
    shard is turned term-major (an inverted index: token -> passages) and multiplied by a block of
    queries, so only the passages sharing a token with a query are touched. Passages sharing none
    (score 0) are not hits.
    Returns (scores [Q, k]: float32, or int64 when quantized; positions int64 [Q, k]: corpus rows, -1 past
    a query's last hit), k = min(topk, number of passages), sorted by descending score, ties to the lower
    position.
    """
    meta = load_meta(index_dir)
    if meta["kind"] != "sparse":
        raise ReprolibError(f"{index_dir} is a {meta['kind']} index; search it with search")
    if not scipy.sparse.issparse(queries) or queries.ndim != 2:
        raise ReprolibError("queries must be a 2-D scipy sparse matrix (SparseEncoder.encode_queries)")
    if queries.shape[1] != meta["dim"]:
        raise ReprolibError(f"queries have {queries.shape[1]} vocabulary entries, the index has {meta['dim']}")
    num_queries, k = queries.shape[0], min(int(topk), meta["num_passages"])
    if k <= 0 or num_queries == 0:
        return np.zeros((num_queries, 0), np.float32), np.zeros((num_queries, 0), np.int64)
    queries = _search_weights(queries, quantize)
    scores = positions = None
    for number in tqdm(range(meta["num_shards"]), desc="searching shards", unit=" shard", disable=not progress):
        path = shard_path(index_dir, number, "sparse")
        try:
            shard = scipy.sparse.load_npz(path)
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise ReprolibError(f"{path}: cannot read the shard ({e}); the index is damaged: re-run `reprolib encode`") from None
        expected = _shard_rows(meta, number)
        if shard.shape[0] != expected:
            raise ReprolibError(f"{path}: {shard.shape[0]} rows, but {INDEX_FILE} promises {expected}; "
                                "the index is damaged: re-run `reprolib encode`")
        postings = _search_weights(shard, quantize).T.tocsr()  # token -> passages
        block = max(1, SCORE_BLOCK // postings.shape[1])
        found = [top_k((queries[start:start + block] @ postings).toarray(), k)
                 for start in range(0, num_queries, block)]
        shard_scores = np.concatenate([f[0] for f in found])
        shard_positions = np.concatenate([f[1] for f in found]) + number * meta["shard_size"]
        scores, positions = _merge_topk(scores, positions, shard_scores, shard_positions, k)
    positions[scores <= 0] = -1
    return scores.astype(np.int64 if quantize else np.float32), positions


def _nonzeros(index_dir, meta):
    """Non-zero weights of every passage, from the shards' row pointers (the weights are not read)."""
    counts = []
    for number in range(meta["num_shards"]):
        with np.load(shard_path(index_dir, number, "sparse")) as f:
            counts.append(np.diff(f["indptr"]))
    return np.concatenate(counts) if counts else np.zeros(0, np.int64)


def _summary(counts):
    if len(counts) == 0:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "max": 0}
    return {"mean": round(float(np.mean(counts)), 2), "median": float(np.median(counts)),
            "p90": float(np.percentile(counts, 90)), "max": int(np.max(counts))}


def sparsity(index_dir, queries=None):
    """How sparse a sparse index (and, given `queries`, a scipy matrix of encoded queries) is:
    {"passages": {"nonzeros": int array, one count per passage, "mean", "median", "p90", "max"},
    "queries": the same per query (with `queries`)}."""
    meta = load_meta(index_dir)
    if meta["kind"] != "sparse":
        raise ReprolibError(f"{index_dir} is a {meta['kind']} index; sparsity needs a sparse one")
    per_row = {"passages": _nonzeros(index_dir, meta)}
    if queries is not None:
        per_row["queries"] = np.diff(scipy.sparse.csr_matrix(queries).indptr)
    return {side: {"nonzeros": counts, **_summary(counts)} for side, counts in per_row.items()}


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
