"""A corpus that scales to MS MARCO's 8.8M passages without 8.8M Python strings.

The first `Corpus.open(source)` streams the source file once into a store directory:

    ids.npy          fixed-width bytes ids, in file order   (memory-mapped)
    id_order.npy, sorted_ids.npy   argsort of ids and the sorted ids, for id -> position lookups
    {title,text}.bin UTF-8 bytes of every field, concatenated  (memory-mapped)
    {title,text}.idx.npy  start offsets, one more than passages

Later opens memory-map the store, so opening is instant and resident memory stays small.
Stores live under $REPROLIB_CACHE (default ~/.cache/reprolib), keyed by the source's absolute
path, size and modification time.
"""
import hashlib
import json
import mmap
import os
import shutil
import socket
import tempfile
from array import array
from pathlib import Path

import numpy as np
from reprolib.progress import tqdm

from reprolib.data.layout import find_corpus_file
from reprolib.errors import DataError
from reprolib.data.formats import check_id, json_record, record_id, record_text
from reprolib.fileio import iter_lines

STORE_VERSION = 2   # 2: meta.json holds the content fingerprint


def cache_root():
    return Path(os.environ.get("REPROLIB_CACHE", Path.home() / ".cache" / "reprolib"))


def _iter_source(path):
    """Yield (line, id, title, text) from corpus.tsv (id,title,text or id,text) or corpus.jsonl."""
    is_json = path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz")
    for number, line in iter_lines(path):
        if is_json:
            record = json_record(path, number, line)
            if "_id" not in record:
                raise DataError(path, number, "not a corpus record: no '_id' field")
            pid = record_id(path, number, record["_id"], "passage id")
            title, text = record_text(path, number, record, "title", False), record_text(path, number, record, "text", False)
        else:
            fields = line.split("\t")
            if len(fields) == 3:
                pid, title, text = fields
            elif len(fields) == 2:
                (pid, text), title = fields, ""
            else:
                raise DataError(path, number, f"expected 2 or 3 tab-separated fields (id, [title,] text), found {len(fields)}")
        check_id(path, number, pid, "passage id")
        if not title.strip() and not text.strip():
            raise DataError(path, number, f"empty passage {pid!r} (no title and no text)")
        yield number, pid, title, text


class _Blob:
    """Append-only UTF-8 field storage: bytes in one file, offsets in an array."""

    def __init__(self, path):
        self.file = open(path, "wb")
        self.offsets = array("q", [0])

    def add(self, value):
        data = value.encode("utf-8")
        self.file.write(data)
        self.offsets.append(self.offsets[-1] + len(data))

    def close(self, index_path):
        self.file.close()
        np.save(index_path, np.frombuffer(self.offsets, dtype=np.int64))


def build_store(source, store_dir, progress=True):
    """Stream `source` into a store at `store_dir`: written to a folder of this process's own, then renamed, so that
    stages opening the same new corpus at once (`reprolib run --jobs`) neither clash nor see a half-written store."""
    source, store_dir = Path(source), Path(store_dir)
    tmp = None
    try:
        store_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_builds(store_dir.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f"{store_dir.name}{_building_here()}{os.getpid()}-", dir=store_dir.parent))
        _write_store(source, tmp, progress)
        _rename_into_place(tmp, store_dir)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(store_dir, None, f"cannot build the corpus store of {source} here ({e.strerror or e}); "
                                         "set REPROLIB_CACHE to a folder with room") from None   # full or read-only
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)   # gone already once renamed
    return store_dir


def _building_here():
    """<store>.building-<host>-<pid>-<random>: a build in progress, or one whose process died."""
    return f".building-{socket.gethostname()}-"


def _remove_abandoned_builds(folder):
    """Delete the temp folders of this machine's builds whose process is gone (killed outright): each can be
    gigabytes. Another machine's, in a cache on a shared disk, are left alone: its pids mean nothing here."""
    here = _building_here()
    for path in folder.glob(f"*{here}*"):
        pid = path.name.rsplit(here, 1)[1].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process
        return True
    return True


def _rename_into_place(tmp, store_dir):
    """Rename the finished `tmp` to `store_dir`. A store that another process finished first is kept (the same
    source, so the same content); a damaged one (no meta.json, which is written last) is set aside and replaced."""
    try:
        os.rename(tmp, store_dir)
    except OSError:
        if (store_dir / "meta.json").exists():
            return
        aside = tmp.with_name(tmp.name + "-damaged")   # still ours: a pid-tagged name
        os.rename(store_dir, aside)
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(tmp, store_dir)


def _write_store(source, tmp, progress):
    titles, texts, ids = _Blob(tmp / "title.bin"), _Blob(tmp / "text.bin"), _Blob(tmp / "id.bin")
    lines = array("q")
    for number, pid, title, text in tqdm(_iter_source(source), desc=f"indexing {source.name}", unit=" passages",
                                         disable=not progress, mininterval=1.0):
        ids.add(pid), titles.add(title), texts.add(text)
        lines.append(number)
    if not lines:
        raise DataError(source, None, "no passages: the corpus is empty")
    for blob, name in ((titles, "title"), (texts, "text"), (ids, "id")):
        blob.close(tmp / f"{name}.idx.npy")
    id_array = _fixed_width_ids(tmp)
    order = np.argsort(id_array, kind="stable")
    sorted_ids = id_array[order]
    duplicates = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if len(duplicates):
        second = order[duplicates[0] + 1]
        raise DataError(source, lines[second], f"duplicate passage id {id_array[second].decode()!r}")
    np.save(tmp / "ids.npy", id_array)
    np.save(tmp / "id_order.npy", order)
    np.save(tmp / "sorted_ids.npy", sorted_ids)
    (tmp / "meta.json").write_text(json.dumps({"version": STORE_VERSION, "source": str(source), "passages": len(id_array),
                                               "fingerprint": _fingerprint(tmp)}))


def _fingerprint(store_dir):
    """A digest of the passages' ids, titles and texts in order: an index is bound to the corpus it encoded."""
    digest = hashlib.sha256()
    for name in ("ids.npy", "title.idx.npy", "title.bin", "text.idx.npy", "text.bin"):
        with open(store_dir / name, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()[:16]


def _fixed_width_ids(tmp):
    raw = (tmp / "id.bin").read_bytes()
    offsets = np.load(tmp / "id.idx.npy")
    width = int(np.diff(offsets).max(initial=1))
    ids = np.zeros(len(offsets) - 1, dtype=f"S{width}")
    for i in range(len(ids)):  # one pass; ids are short
        ids[i] = raw[offsets[i]:offsets[i + 1]]
    (tmp / "id.bin").unlink(), (tmp / "id.idx.npy").unlink()
    return ids


def _map_bytes(path):
    if path.stat().st_size == 0:  # mmap cannot map an empty file (e.g. a corpus without titles)
        return b""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class Corpus:
    """Read-only, memory-mapped passages: `corpus[i]`, `corpus.get(pid)`, `len(corpus)`."""

    def __init__(self, store_dir):
        store_dir = Path(store_dir)
        self.store_dir = store_dir
        self.ids = np.load(store_dir / "ids.npy", mmap_mode="r")
        self._order = np.load(store_dir / "id_order.npy", mmap_mode="r")
        self._sorted_ids = np.load(store_dir / "sorted_ids.npy", mmap_mode="r")
        # mmap.mmap slices are ~5x cheaper per field than np.memmap slices (no ndarray wrapper)
        self._fields = {name: (_map_bytes(store_dir / f"{name}.bin"), np.load(store_dir / f"{name}.idx.npy", mmap_mode="r"))
                        for name in ("title", "text")}

    @classmethod
    def open(cls, source, progress=True):
        """Open a corpus file or dataset directory, building its store on first use."""
        source = find_corpus_file(source).resolve()
        stat = source.stat()
        key = hashlib.sha256(f"{source}|{stat.st_size}|{stat.st_mtime_ns}|{STORE_VERSION}".encode()).hexdigest()[:16]
        store_dir = cache_root() / "corpus" / f"{source.stem}-{key}"
        if not (store_dir / "meta.json").exists():
            build_store(source, store_dir, progress=progress)
        return cls(store_dir)

    @property
    def fingerprint(self):
        return json.loads((self.store_dir / "meta.json").read_text())["fingerprint"]

    def __len__(self):
        return len(self.ids)

    def _field(self, name, i):
        data, offsets = self._fields[name]
        start, end = offsets[i:i + 2].tolist()
        return data[start:end].decode("utf-8")

    def id(self, i):
        return self.ids[i].decode("utf-8")

    def title(self, i):
        return self._field("title", i)

    def text(self, i):
        return self._field("text", i)

    def __getitem__(self, i):
        return {"id": self.id(i), "title": self.title(i), "text": self.text(i)}

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def positions(self, pids):
        """Positions of `pids` in the corpus; -1 where an id is absent."""
        encoded = [p.encode("utf-8") for p in pids]
        keys = np.asarray(encoded, dtype=self.ids.dtype) if encoded else np.zeros(0, self.ids.dtype)
        fits = np.array([len(e) <= self.ids.dtype.itemsize for e in encoded], dtype=bool)  # longer ids were truncated
        positions = np.full(len(keys), -1, np.int64)
        positions[fits] = self._ids_as_rows(keys[fits])
        search = np.flatnonzero((positions < 0) & fits)
        slot = np.searchsorted(self._sorted_ids, keys[search]).clip(0, len(self) - 1)
        found = self._sorted_ids[slot] == keys[search]
        positions[search[found]] = self._order[slot[found]]
        return positions

    def _ids_as_rows(self, keys):
        """Each id read as its own row number, where the corpus has it there (MS MARCO's ids are "0".."8841822"),
        else -1. One lookup per id: a binary search of 8.8M ids costs 3-8x more, mostly cache misses."""
        try:
            rows = keys.astype(np.int64)
        except (ValueError, OverflowError):            # an id that is not a number: search them all
            return np.full(len(keys), -1, np.int64)
        inside = (rows >= 0) & (rows < len(self))
        rows = np.where(inside, rows, 0)
        return np.where(inside & (self.ids[rows] == keys), rows, -1)

    def get(self, pid):
        position = int(self.positions([pid])[0])
        if position < 0:
            raise KeyError(pid)
        return self[position]

    def missing(self, pids):
        """The subset of `pids` that the corpus lacks."""
        pids = list(pids)
        return [p for p, pos in zip(pids, self.positions(pids)) if pos < 0]
