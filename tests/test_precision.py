"""mixed_precision "auto": bf16 only where the device computes it natively."""
import pytest
import torch

from reprolib.errors import ReprolibError
from reprolib.modeling import encoder
from reprolib.modeling.encoder import autocast, resolve_precision


@pytest.mark.parametrize("flags, expected", [
    ("fpu avx avx2 avx512f", "no"),                 # AVX2 / plain AVX-512: bf16 would be emulated, slower
    ("fpu avx2 avx512f avx512_bf16", "bf16"),
    ("fpu avx2 amx_bf16 amx_tile", "bf16"),
])
def test_auto_takes_bf16_only_on_a_cpu_that_has_it(monkeypatch, flags, expected):
    monkeypatch.setattr(encoder.Path, "read_text", lambda self, *a, **k: f"processor : 0\nflags : {flags}\n")
    assert resolve_precision("auto", "cpu") == expected


def test_explicit_precisions_pass_through():
    for precision in ("no", "bf16", "fp16", None):
        assert resolve_precision(precision, "cpu") == precision


def test_autocast_resolves_auto_and_refuses_unknown_precisions():
    with autocast("auto", "cpu"):
        assert torch.zeros(1).dtype == torch.float32
    with pytest.raises(ReprolibError, match="precision must be no, fp16, bf16 or auto, not 'fp8'"):
        autocast("fp8", "cpu")
