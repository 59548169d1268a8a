"""Benchmark: what a pipeline stage costs before its first real cell, with and without forked kernels.

    .venv/bin/python bench/kernel_start.py                  # -> bench/results/kernel_start.json
    REPROLIB_FORK_KERNELS=0 .venv/bin/python bench/kernel_start.py --out /tmp/no_fork.json

A pipeline of STAGES stages, each a notebook that does what every stage notebook does first: import torch,
transformers and the reprolib modules, and load a small BERT. The run's wall time over STAGES is the
per-stage cost. With REPROLIB_FORK_KERNELS=0 each stage starts Python and imports afresh; by default each
kernel is forked from the run's warm zygote (reprolib.kernels).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchutil import RESULTS, header, write_json

STAGES = 6
NOTEBOOK_CELL = """\
import torch, transformers
from transformers import BertConfig, BertModel
from reprolib import index, plots, training
from reprolib.pipeline import save_metrics
BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
save_metrics(out_dir, {"modules": len(sys.modules)})
"""


def write_pipeline(root):
    import nbformat
    import yaml

    (root / "notebooks").mkdir()
    (root / "params").mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell('out_dir = ""', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import sys\n" + NOTEBOOK_CELL)]
    nbformat.write(nb, root / "notebooks" / "stage.ipynb")
    stages = [{"id": f"s{i}", "notebook": "stage"} for i in range(STAGES)]
    path = root / "params" / "p.yaml"
    path.write_text(yaml.safe_dump({"run": "kernels", "stages": stages}))
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "kernel_start.json")
    args = parser.parse_args()

    from reprolib.pipeline import run_pipeline

    forked = os.environ.get("REPROLIB_FORK_KERNELS") != "0" and sys.platform.startswith("linux")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_pipeline(Path(tmp))
        started = time.perf_counter()
        manifest = run_pipeline(path, out_root=Path(tmp) / "outputs", log=lambda *_: None)
        seconds = time.perf_counter() - started
    stage_seconds = [entry["wall_s"] for entry in manifest["stages"].values()]
    result = header("kernel_start")
    result.update(forked_kernels=forked, stages=STAGES, run_seconds=round(seconds, 2),
                  seconds_per_stage=round(seconds / STAGES, 2), stage_wall_s=stage_seconds)
    write_json(args.out, result)
    print(f"{'forked' if forked else 'fresh'} kernels: {seconds:.1f} s for {STAGES} stages "
          f"({seconds / STAGES:.2f} s each; stage walls {stage_seconds})")


if __name__ == "__main__":
    main()
