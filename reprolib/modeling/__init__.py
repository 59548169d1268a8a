"""Models: the dense bi-encoder, the sparse (lexicon) encoder, the cross-encoder, and pretraining models.

Imports are lazy so that `import reprolib.modeling` (and the CLI) does not pay for torch/transformers.
"""

__all__ = ["CrossEncoder", "DenseEncoder", "SparseEncoder", "load_encoder"]


def load_encoder(name_or_path, device=None, **kwargs):
    """The encoder a model folder holds: SparseEncoder when its reprolib_encoder.json says kind "sparse",
    else DenseEncoder (also for HF names and folders without that file), on `device` (default: this
    process's, the GPU when there is one). `kwargs` go to `from_pretrained`."""
    from reprolib.errors import ReprolibError
    from reprolib.index import process_state
    from reprolib.modeling.encoder import saved_config

    saved = saved_config(name_or_path) or {}
    if saved.get("kind") == "cross_encoder":
        raise ReprolibError(f"{name_or_path} is a cross-encoder: it reranks (reprolib rerank), it cannot encode")
    if saved.get("kind") == "sparse":
        from reprolib.modeling.sparse import SparseEncoder

        encoder = SparseEncoder.from_pretrained(name_or_path, **kwargs)
    else:
        from reprolib.modeling.dense import DenseEncoder

        encoder = DenseEncoder.from_pretrained(name_or_path, **kwargs)
    return encoder.to(device or process_state().device)


def __getattr__(name):
    if name == "DenseEncoder":
        from reprolib.modeling.dense import DenseEncoder

        return DenseEncoder
    if name == "CrossEncoder":
        from reprolib.modeling.cross_encoder import CrossEncoder

        return CrossEncoder
    if name == "SparseEncoder":
        from reprolib.modeling.sparse import SparseEncoder

        return SparseEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
