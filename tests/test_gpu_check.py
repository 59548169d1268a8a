"""bench/gpu_check.py, the GPU figures' script, where CI runs: without CUDA it names what is missing and measures nothing."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "bench" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the script itself")
def test_without_cuda_it_names_what_is_missing_and_writes_nothing(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out-dir", str(tmp_path / "figures")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("gpu_check: this machine lacks a CUDA device")
    assert not (tmp_path / "figures").exists()
