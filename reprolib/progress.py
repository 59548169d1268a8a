"""Progress bars that suit where they are seen.

In a notebook someone is watching, tqdm's widget bar; in a pipeline stage (papermill runs the notebook and keeps
its outputs, `REPROLIB_STAGE` is set) a plain text bar on stdout, redrawn every few seconds: a stored widget
reopens frozen at 0%, and a bar on stderr is stored as red error text. Elsewhere (a terminal, a log) tqdm's own.
"""
import os
import sys
import warnings

from tqdm.std import TqdmWarning
from tqdm.std import tqdm as _text_tqdm

STAGE_ENV = "REPROLIB_STAGE"   # set by the pipeline in the environment of its kernels
# What a stage kernel's environment gets: text bars from reprolib, and none from Hugging Face's libraries
# ("Loading weights", "Writing model shards": finished in a blink, kept as red text in the notebook).
STAGE_ENVIRONMENT = {STAGE_ENV: "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class _StageBar(_text_tqdm):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("file", sys.stdout)
        kwargs.setdefault("mininterval", 10.0)
        kwargs.setdefault("ascii", True)
        super().__init__(*args, **kwargs)


if os.environ.get(STAGE_ENV):
    tqdm = _StageBar
    # libraries that import tqdm.auto in a kernel without ipywidgets warn, then use text bars anyway
    warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
else:   # (tqdm.auto warns at import in a kernel without ipywidgets: not imported in a stage)
    from tqdm.auto import tqdm
