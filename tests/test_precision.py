"""mixed_precision "auto": bf16 only where the device computes it natively."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reprolib.errors import ReprolibError
from reprolib.modeling import encoder
from reprolib.modeling.encoder import autocast, autocast_precision, resolve_precision


@pytest.mark.parametrize("flags, onednn_cap, expected", [
    ("fpu avx avx2 avx512f", None, "no"),           # AVX2 / plain AVX-512: bf16 would be emulated, slower
    ("fpu avx2 avx512f avx512_bf16", None, "bf16"),
    ("fpu avx2 amx_bf16 amx_tile", None, "bf16"),
    ("fpu avx2 amx_bf16 amx_tile", "AVX2", "no"),   # oneDNN capped below the bf16 instructions
    ("fpu avx2 amx_bf16 amx_tile", "avx512_core", "no"),
    ("fpu avx2 amx_bf16 amx_tile", "AVX512_CORE_AMX", "bf16"),
])
def test_auto_takes_bf16_only_on_a_cpu_that_has_it(monkeypatch, flags, onednn_cap, expected):
    monkeypatch.setattr(encoder.Path, "read_text", lambda self, *a, **k: f"processor : 0\nflags : {flags}\n")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if onednn_cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_cap)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert resolve_precision("auto", "cpu") == expected


def test_auto_takes_no_bf16_where_onednn_is_capped_at_avx2():
    """The cap bench/slower_kind.py sets, in a process started with it; without it the CPU's flags decide."""
    code = "from reprolib.modeling import encoder; print(encoder.native_bf16('cpu'))"
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    capped = subprocess.run([sys.executable, "-c", code], env={**env, "ONEDNN_MAX_CPU_ISA": "AVX2"},
                            capture_output=True, text=True, check=True)
    assert capped.stdout.split() == ["False"]
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    uncapped = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert uncapped.stdout.split() == [str("avx512_bf16" in flags or "amx_bf16" in flags)]


def test_explicit_precisions_pass_through():
    for precision in ("no", "bf16", "fp16", None):
        assert resolve_precision(precision, "cpu") == precision


def test_autocast_resolves_auto_and_refuses_unknown_precisions():
    with autocast("auto", "cpu"):
        assert torch.zeros(1).dtype == torch.float32
    with pytest.raises(ReprolibError, match="precision must be no, fp16, bf16 or auto, not 'fp8'"):
        autocast("fp8", "cpu")


def test_autocast_precision_reads_the_autocast_in_effect():
    assert autocast_precision("cpu") == "no"
    with autocast("bf16", "cpu"):
        assert autocast_precision("cpu") == "bf16"
        with torch.autocast("cpu", enabled=False):   # as the cross-encoder's head runs
            assert autocast_precision("cpu") == "no"
