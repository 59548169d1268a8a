"""The notebooks and pipelines that ship with the package.

In a checkout they are the top-level `notebooks/` and `params/`. A wheel carries copies of both under
`reprolib/bundled/` (pyproject.toml maps them there), so `reprolib run quickstart` works after a plain
`pip install`, from any directory, and `reprolib notebooks DEST` hands a student their own copy.
"""
from pathlib import Path

from reprolib.errors import ReprolibError
from reprolib.fileio import atomic_write

FOLDERS = ("notebooks", "params")
SUFFIXES = {"notebooks": ".ipynb", "params": ".yaml"}


def root():
    """The folder holding notebooks/ and params/: the installed copy, else the checkout around the package."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "bundled", package.parent):
        if all((candidate / folder).is_dir() for folder in FOLDERS):
            return candidate
    raise ReprolibError(f"no notebooks/ and params/ found beside {package}: reinstall reprolib")


def files(folder):
    """The shipped files of `folder` ("notebooks" or "params"), relative to it, sorted."""
    base = root() / folder
    found = (p.relative_to(base) for p in base.rglob(f"*{SUFFIXES[folder]}"))
    return sorted(p for p in found if ".ipynb_checkpoints" not in p.parts and "outputs" not in p.parts)   # inside it


def pipelines():
    """Names `reprolib run` accepts for the shipped pipelines: quickstart, miniature/retromae, ..."""
    return [p.with_suffix("").as_posix() for p in files("params")]


def pipeline_path(name):
    """A pipeline YAML path for `reprolib run NAME`: an existing file as given, else a shipped pipeline."""
    given = Path(name)
    if given.is_file():
        return given
    shipped = root() / "params" / f"{given.with_suffix('').as_posix()}.yaml"
    if given.suffix in ("", ".yaml") and shipped.is_file():
        return shipped
    raise ReprolibError(f"{name}: no such pipeline file, and not a shipped pipeline "
                        f"(one of: {', '.join(pipelines())})")


def copy_course(dest, force=False):
    """Copy notebooks/ and params/ into `dest`, for a student to open and run; returns the files copied.

    Refuses to overwrite a file unless `force`, so a second run never replaces a student's edits."""
    source, dest = root(), Path(dest)
    pairs = [(source / folder / f, dest / folder / f) for folder in FOLDERS for f in files(folder)]
    clashes = [target for _, target in pairs if target.exists()]
    if clashes and not force:
        raise ReprolibError(f"{clashes[0]} exists ({len(clashes)} file(s) would be overwritten); "
                            "choose another folder or pass --force")
    for shipped, target in pairs:
        with atomic_write(target, "wb") as out:
            out.write(shipped.read_bytes())
    return [target for _, target in pairs]
