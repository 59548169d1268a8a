"""reprolib: reproduce dense-retrieval recipes from parameterized notebooks."""
__version__ = "0.1.0"
