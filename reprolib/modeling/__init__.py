"""Models: the dense bi-encoder (and, later, pretraining / sparse / cross-encoder models).

Imports are lazy so that `import reprolib.modeling` (and the CLI) does not pay for torch/transformers.
"""

__all__ = ["DenseEncoder"]


def __getattr__(name):
    if name == "DenseEncoder":
        from reprolib.modeling.dense import DenseEncoder

        return DenseEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
