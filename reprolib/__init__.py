"""reprolib: reproduce dense-retrieval recipes from parameterized notebooks."""
__version__ = "0.1.0"

# First, so that a pipeline stage's progress-bar settings hold before any library imports tqdm.
import reprolib.progress  # noqa: F401,E402
