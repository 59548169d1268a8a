"""Progress bars that suit where they are seen.

In a notebook someone is watching, tqdm's widget bar; in a pipeline stage (papermill runs the notebook and keeps
its outputs, `REPROLIB_STAGE` is set) a plain text line on stdout when the bar finishes, and for a bar that runs
over a minute one at each quarter: a stored widget reopens frozen at 0%, a bar on stderr is stored as red error
text, and JupyterLab shows each redraw of a stored text bar as a line of its own. Elsewhere (a terminal, a log)
tqdm's own.
reprolib's own notices (a head added to a checkpoint, an index rebuilt) are `note:` lines on stdout in a stage,
not red stderr boxes.
"""
import logging
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
    LONG = 60.0   # seconds after which a running bar also reports each quarter
    UPDATE_S = 0.5   # how often a bar over an iterable passes on its count

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("file", sys.stdout)
        kwargs.setdefault("ascii", True)
        kwargs["delay"] = float("inf")   # tqdm draws nothing by itself; the lines below are the bar's output
        self._quarter = 0
        super().__init__(*args, **kwargs)

    def update(self, n=1):
        shown = super().update(n)
        if not self.disable and self.total:
            quarter = int(4 * self.n / self.total)
            elapsed = self._time() - self.start_t
            if self._quarter < quarter < 4 and elapsed > self.LONG:   # a note, not a bar that looks stuck
                self._quarter = quarter
                self._write(f"{self.desc}: {self.n:,} of {self.total:,} after {self.format_interval(elapsed)}")
        return shown

    def __iter__(self):
        """tqdm's own loop counts an item only when it would draw, which with delay=inf is never: count them here, so
        that a bar over an iterable gets its quarter notes too; passed on every UPDATE_S, as corpus stores iterate
        millions of passages and an update per item would cost five times the loop."""
        if self.disable:
            yield from self.iterable
            return
        pending, last = 0, self._time()
        try:
            for item in self.iterable:
                yield item
                pending += 1
                now = self._time()
                if now - last >= self.UPDATE_S:
                    self.update(pending)
                    pending, last = 0, now
        finally:
            self.update(pending)
            self.close()

    def close(self):
        if not self.disable and self.leave:
            self._write(self.format_meter(**self.format_dict))
        super().close()

    def _write(self, line):
        self.fp.write(line + "\n")
        self.fp.flush()


class _StdoutNotes(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record comes: a stage kernel forked from a warm process (reprolib.
    kernels) gets its notebook's stdout only after this module was imported."""
    reprolib_notes = True

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("note: %(message)s"))

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def _notes_on_stdout():
    """reprolib's log records as `note: ...` lines on stdout (once per process)."""
    logger = logging.getLogger("reprolib")
    if not any(getattr(handler, "reprolib_notes", False) for handler in logger.handlers):
        logger.addHandler(_StdoutNotes())
        logger.propagate = False


if os.environ.get(STAGE_ENV):
    tqdm = _StageBar
    _notes_on_stdout()
    # libraries that import tqdm.auto in a kernel without ipywidgets warn, then use text bars anyway
    warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
else:   # (tqdm.auto warns at import in a kernel without ipywidgets: not imported in a stage)
    from tqdm.auto import tqdm
