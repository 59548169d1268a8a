"""mixed_precision "auto": bf16 only where the device computes it natively."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reprolib.errors import ReprolibError
from reprolib.modeling import encoder
from reprolib.modeling.encoder import autocast, resolve_precision


@pytest.mark.parametrize("flags, onednn_bf16, expected", [
    ("fpu avx avx2 avx512f", True, "no"),           # AVX2 / plain AVX-512: bf16 would be emulated, slower
    ("fpu avx2 avx512f avx512_bf16", True, "bf16"),
    ("fpu avx2 amx_bf16 amx_tile", True, "bf16"),
    ("fpu avx2 amx_bf16 amx_tile", False, "no"),    # oneDNN capped below AVX-512 (ONEDNN_MAX_CPU_ISA)
])
def test_auto_takes_bf16_only_on_a_cpu_that_has_it(monkeypatch, flags, onednn_bf16, expected):
    monkeypatch.setattr(encoder.Path, "read_text", lambda self, *a, **k: f"processor : 0\nflags : {flags}\n")
    monkeypatch.setattr(encoder, "_onednn_bf16", lambda: onednn_bf16)
    assert resolve_precision("auto", "cpu") == expected


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not torch.backends.mkldnn.is_available(),
                    reason="ONEDNN_MAX_CPU_ISA caps x86 oneDNN only")
def test_auto_takes_no_bf16_where_onednn_is_capped_at_avx2():
    """The cap bench/slower_kind.py sets; without it the same code follows the CPU's flags."""
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
