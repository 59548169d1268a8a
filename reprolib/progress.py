"""Progress bars that suit where they are seen.

In a notebook someone is watching, tqdm's widget bar; in a pipeline stage (papermill runs the notebook and keeps
its outputs, `REPROLIB_STAGE` is set) a plain text bar on stdout, redrawn every few seconds: a stored widget
reopens frozen at 0%, and a bar on stderr is stored as red error text. Elsewhere (a terminal, a log) tqdm's own.
"""
import os
import sys

from tqdm.std import tqdm as _text_tqdm

STAGE_ENV = "REPROLIB_STAGE"   # set by the pipeline in the environment of its kernels


class _StageBar(_text_tqdm):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("file", sys.stdout)
        kwargs.setdefault("mininterval", 10.0)
        kwargs.setdefault("ascii", True)
        super().__init__(*args, **kwargs)


if os.environ.get(STAGE_ENV):
    tqdm = _StageBar
else:   # (tqdm.auto warns at import in a kernel without ipywidgets: not imported in a stage)
    from tqdm.auto import tqdm
