"""Reading text files line by line with precise errors, writing files atomically, and stamping the files a run
reads (to tell whether they changed since)."""
import contextlib
import errno
import filecmp
import gzip
import json
import os
import tempfile
import zlib
from pathlib import Path

from reprolib.errors import DataError

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)   # a write's own failures: no room, over quota, too large
_UMASK = os.umask(0)
os.umask(_UMASK)


def open_binary(path):
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, "file not found")
    if path.is_dir():
        raise DataError(path, None, "is a directory, expected a file")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_lines(path, skip_blank=True):
    """Yield (line_number, text) with the line ending (LF or CRLF) stripped.

    Decodes strictly as UTF-8 so a bad byte is reported with its line, not replaced silently. A UTF-8 byte
    order mark (Windows editors write one) is dropped: it would otherwise become part of the first id.
    A damaged .gz file is reported with the line where it broke.
    """
    with open_binary(path) as f:
        number = 0
        try:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(path, number, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
                if "\x00" in line:
                    raise DataError(path, number, f"NUL byte at column {line.index(chr(0)) + 1} (a binary file?)")
                if number == 1:
                    line = line.removeprefix("\ufeff")
                line = line.rstrip("\r\n")
                if skip_blank and not line.strip():
                    continue
                yield number, line
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(path, number + 1 if number else None, f"damaged gzip file ({e})") from None



def split_fields(path, number, line, counts, sep="\t"):
    """Split a delimited line and check its field count is one of `counts`."""
    fields = line.split(sep) if sep else line.split()
    if len(fields) not in counts:
        want = " or ".join(str(c) for c in counts)
        raise DataError(path, number, f"expected {want} fields, found {len(fields)}: {line[:80]!r}")
    return fields


@contextlib.contextmanager
def atomic_write(path, mode="w", encoding="utf-8", keep_unchanged=True):
    """Open a temp file beside `path`; rename it over `path` only if the block succeeds. A file written again with
    the same bytes is left as it was, its modification time too (`keep_unchanged`): what reads it (a training's
    `run_digest`, the corpus store) sees no new input when a stage is rerun by hand to the same result. A caller
    that goes on to change the file in place (append to it) passes keep_unchanged=False: the file it gets is then
    its own, never another's through a link."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise DataError(path, None, f"cannot write here ({e.strerror})") from None
    in_block = True
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding, newline=None if "b" in mode else "\n") as f:
            yield f
            in_block = False
            _sync(f)
        if keep_unchanged and _same_bytes(tmp, path):
            os.unlink(tmp)
            return
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        # past the block every OSError is the output's (a delayed write error at the sync, a folder in the way, a
        # read-only file system); in it only a write's own (disk full, ...): an input failing as the block reads it
        # is the caller's to name
        if isinstance(e, OSError) and (not in_block or e.filename in (tmp, str(path))
                                       or e.filename is None and e.errno in _FULL):
            raise DataError(path, None, f"cannot write here ({e.strerror or e})") from None
        raise


def _sync(f):
    """The bytes on disk before the rename, so a crash leaves the old file or the new, never an empty one. A block
    may have closed the file itself; a file system without fsync (some FUSE mounts) only skips it."""
    if f.closed:
        return
    f.flush()
    try:
        os.fsync(f.fileno())
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise


def _same_bytes(new, old):
    """Whether the file `old` exists and holds the bytes of `new`; an old file that cannot be read counts as other."""
    try:
        return old.is_file() and filecmp.cmp(new, old, shallow=False)
    except OSError:
        return False


def is_built(marker, recipe):
    """Whether a built folder's `marker` file records `recipe`; a marker cut short or unreadable counts as not built
    (the folder is built again)."""
    try:
        return json.loads(Path(marker).read_text()) == recipe
    except (OSError, ValueError):
        return False


def mark_built(marker, recipe):
    """Record `recipe` in `marker`, the last file a build writes: a folder without it is built again."""
    with atomic_write(marker) as f:
        f.write(json.dumps(recipe, indent=2) + "\n")


NOT_INPUTS = ("params.json", "metrics.json", "kernel.log")   # a pipeline stage's bookkeeping beside its data


def file_stamps(path, skip_under=None):
    """(name under `path`, size, mtime_ns) of the file `path`, or of each file in the folder `path` (through its
    links, as `link_local` makes them), less hidden ones (JupyterLab's .ipynb_checkpoints), a stage's notebook, plots
    and bookkeeping, and whatever lies under `skip_under` (a training's out_dir: what it writes is not its input)."""
    path = Path(path)
    if path.is_file():
        return [(path.name, path.stat().st_size, path.stat().st_mtime_ns)]
    skip, seen, found = Path(skip_under).resolve() if skip_under else None, set(), []
    for root, dirs, names in os.walk(path, followlinks=True):
        real = Path(root).resolve()
        if real in seen or (skip is not None and (real == skip or skip in real.parents)):   # a link cycle, or skipped
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or name in NOT_INPUTS or name.endswith((".ipynb", ".png")):
                continue
            try:
                stat = (Path(root) / name).stat()
            except OSError:   # removed while we looked, or a dangling link: not an input
                continue
            found.append(((Path(root) / name).relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns))
    return found
