"""Resumable HTTP(S) downloads with checksums, and safe atomic archive extraction.

A download streams into `<dest>.part` and is renamed to `<dest>` only once it is complete and its
checksum (when given) matches, so `<dest>` existing means "done". A `.part` left by a crash or a
dropped connection is resumed with an HTTP Range request.
"""
import contextlib
import gzip
import hashlib
import http.client
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from reprolib.errors import ReprolibError
from reprolib.progress import tqdm

CHUNK = 1 << 20
USER_AGENT = "reprolib-download/1"


def file_digest(path, algorithm):
    """Hex digest of a file, read in chunks so a multi-GB archive is never held in memory."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _checksum_problem(path, expected):
    """Return 'algorithm: expected X, got Y' for the first mismatching checksum, else None."""
    for algorithm, want in expected.items():
        if want is not None:
            got = file_digest(path, algorithm)
            if got != want.lower():
                return f"{algorithm} mismatch: expected {want.lower()}, got {got}"
    return None


def download(url, dest, sha256=None, md5=None, progress=True, retries=5, timeout=60):
    """Download `url` to `dest` (resuming a previous `.part`) and return `dest` as a Path.

    An existing `dest` whose checksum matches (or when no checksum is given) is kept as is. A
    connection that drops mid-transfer is resumed up to `retries` times in a row without progress.
    """
    dest = Path(dest)
    expected = {"sha256": sha256, "md5": md5}
    if dest.exists():
        if _checksum_problem(dest, expected) is None:
            return dest
        dest.unlink()  # stale or corrupt: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    failures = 0  # consecutive attempts that ended early without adding bytes
    while True:
        before = _size(part)
        if _fetch_into(url, part, progress, timeout):
            break
        failures = 0 if _size(part) > before else failures + 1
        if failures > retries:
            raise ReprolibError(f"download of {url} kept failing: gave up after {retries} retries ({part} is kept; run again to resume)")
        time.sleep(failures)  # resume at once after progress, back off while the server makes none

    problem = _checksum_problem(part, expected)
    if problem:
        part.unlink()
        raise ReprolibError(f"{dest}: {problem} (downloaded from {url}; the bad file was removed)")
    part.replace(dest)
    return dest


def _fetch_into(url, part, progress, timeout):
    """One HTTP request that appends to `part` from its current size. True when `part` is complete.

    Errors before the response starts (HTTP status, connection refused, DNS) are final and raise;
    a transfer that ends early returns False so the caller resumes it.
    """
    offset = _size(part)
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as e:
        if e.code == 416 and offset and _range_total(e.headers.get("Content-Range")) == offset:
            return True  # the .part already holds the whole file (crash between download and rename)
        if e.code == 416:
            part.unlink()  # .part does not fit the file on the server: start over
            return False
        raise ReprolibError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
        reason = e.reason if isinstance(e, URLError) else e
        raise ReprolibError(f"download of {url} failed: {reason}") from None

    with response:
        content_range = response.headers.get("Content-Range")
        if response.status == 206:
            if _range_start(content_range) != offset:
                part.unlink()  # not the range we asked for: its bytes cannot be appended
                return False
            mode, total = "ab", _range_total(content_range)
        else:  # a plain 200: the server ignores Range, so restart from zero
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=part.name[:-len(".part")], disable=not progress) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException):
                    return False   # the connection dropped: the caller resumes
                if not chunk:
                    break
                try:
                    f.write(chunk)
                except OSError as e:   # this disk, not the network: no retry helps
                    raise ReprolibError(f"{part}: cannot write the download ({e.strerror or e})") from None
                bar.update(len(chunk))
    return total is None or _size(part) == total


def _size(path):
    return path.stat().st_size if path.exists() else 0


def _range_start(content_range):
    """First byte of 'bytes START-END/TOTAL', or None."""
    try:
        return int(content_range.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


def _range_total(content_range):
    """TOTAL of 'bytes START-END/TOTAL' or 'bytes */TOTAL', or None when unknown ('*')."""
    try:
        return int(content_range.rsplit("/", 1)[1])
    except (AttributeError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------
def extract(archive, dest_dir, prefix=""):
    """Extract a .tar, .tar.gz or .zip archive into `dest_dir` and return `dest_dir` as a Path.

    Only members under `prefix` (e.g. "marco/") are extracted, with the prefix stripped. Every member
    name is checked first: absolute paths, '..' components, links and device files are refused. The
    archive is unpacked into a staging directory beside `dest_dir`, then renamed: a new `dest_dir`
    appears whole; into an existing one, each top-level entry is renamed over its namesake.
    """
    archive, dest_dir = Path(archive), Path(dest_dir).absolute()
    want = PurePosixPath(prefix).parts if prefix else ()
    staging = dest_dir.with_name(f".{dest_dir.name}.extracting")
    if staging.exists():
        shutil.rmtree(staging)  # left over from a crashed run
    staging.mkdir(parents=True)
    try:
        found = 0
        with _damage_named(archive):
            for name, is_dir, open_member in _members(archive):
                parts = _safe_parts(archive, name)
                if parts[:len(want)] != want or len(parts) == len(want):
                    continue
                target = staging.joinpath(*parts[len(want):])
                found += 1
                if is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with open_member() as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
        if not found:
            raise ReprolibError(f"{archive}: no members under {prefix!r}" if prefix else f"{archive}: archive is empty")
        if not dest_dir.exists():
            staging.rename(dest_dir)
            return dest_dir
        for entry in staging.iterdir():
            target = dest_dir / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            entry.replace(target)
        staging.rmdir()
        return dest_dir
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def _damage_named(archive):
    """Reading a damaged archive (truncated, a failed CRC) raises one line naming it: a download without a checksum
    is kept, and would be read again on every run."""
    try:
        yield
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ReprolibError(f"{archive}: damaged archive ({e}); delete it and run again to download it afresh") \
            from None


def _members(archive):
    """Yield (name, is_dir, open) for each member of a zip or tar archive, refusing links and devices."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise ReprolibError(f"{archive}: member {info.filename!r} is a symbolic link; refusing to extract")
                yield info.filename, info.is_dir(), lambda info=info: zf.open(info)
        return
    try:
        tf = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise ReprolibError(f"{archive}: not a readable tar or zip archive ({e})") from None
    with tf:
        for member in tf:
            if not (member.isfile() or member.isdir()):
                raise ReprolibError(f"{archive}: member {member.name!r} is a link or special file; refusing to extract")
            yield member.name, member.isdir(), lambda member=member: tf.extractfile(member)
        while tf.fileobj.read(CHUNK):   # past the end-of-archive blocks to gzip's trailer: its CRC is checked there
            pass


def _safe_parts(archive, name):
    """Path components of a member name, refusing anything that could land outside the target."""
    posix = name.replace("\\", "/")
    path = PurePosixPath(posix)
    if path.is_absolute() or ".." in path.parts or (len(posix) > 1 and posix[1] == ":"):
        raise ReprolibError(f"{archive}: member {name!r} points outside the extraction directory; refusing to extract")
    return path.parts
