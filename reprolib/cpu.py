"""What this machine's CPU can do, read from /proc/cpuinfo (Linux; elsewhere nothing is known)."""
import contextlib
import os
from pathlib import Path

# What decides a CPU's speed here: AVX-512 and native bf16 ran the same stages 2-3x faster than AVX2 alone
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")

# Environment variables that cap each library's SIMD code at AVX2 when it loads, so that a fast machine runs the
# slower kind's code paths (bench/slower_kind.py sets them; REPORT.md names the ones set)
SIMD_CAPS = {
    "ATEN_CPU_CAPABILITY": "avx2",          # torch's own kernels (element-wise, softmax, layer norm)
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",      # torch's fp32 matmuls
    "ONEDNN_MAX_CPU_ISA": "AVX2",           # torch's bf16 matmuls: emulated, so mixed_precision auto picks fp32
    "OPENBLAS_CORETYPE": "Haswell",         # the BLAS of numpy, scipy and faiss
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",   # numpy's own loops
    "FAISS_SIMD_LEVEL": "AVX2",             # faiss's distance kernels
}

# oneDNN's ISA names below AVX512_CORE_BF16, the first with bf16 instructions
ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}

# OpenBLAS's kernels by the instructions they need, fastest first
OPENBLAS_CORETYPES = (("SkylakeX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}),
                      ("Haswell", {"avx2", "fma"}))


def _cpuinfo(key):
    """The value of the first /proc/cpuinfo line that starts with `key` ("flags", "model name"); None where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(key)), None)


def cpu_flags():
    """The CPU's feature flags as the kernel reports them (avx2, avx512f, amx_bf16, ...); empty where unknown."""
    return set((_cpuinfo("flags") or "").split())


def native_bf16():
    """Whether torch computes bf16 natively on this CPU: the CPU has avx512_bf16 or AMX, and oneDNN, which runs
    torch's bf16 matmuls, is not capped below them (ONEDNN_MAX_CPU_ISA, or its older name DNNL_MAX_CPU_ISA, as
    bench/slower_kind.py caps it to time the slower kind of machine on a fast one). Emulated bf16 is slow: capped at
    AVX2, a bf16 matmul took 34 times as long as fp32 (bench/README.md, "The slower kind on a fast machine")."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"}) and cap.upper() not in ONEDNN_ISAS_WITHOUT_BF16


def describe():
    """The CPU model and its SPEED_FLAGS, with the SIMD_CAPS set in this process (for REPORT.md); None where
    /proc/cpuinfo does not name the model."""
    model = _cpuinfo("model name")
    if model is None:
        return None
    speed = [flag for flag in SPEED_FLAGS if flag in cpu_flags()]
    capped = [f"{name}={value}" for name, value in SIMD_CAPS.items() if os.environ.get(name) == value]
    return (model + (f" ({' '.join(speed)})" if speed else "")
            + (f", capped: {' '.join(capped)}" if capped else ""))


def openblas_coretype():
    """The fastest OpenBLAS kernels this CPU runs (an OPENBLAS_CORETYPE value), or None to leave OpenBLAS to choose."""
    flags = cpu_flags()
    return next((name for name, needs in OPENBLAS_CORETYPES if needs <= flags), None)


@contextlib.contextmanager
def openblas_kernels_named():
    """Load a library that bundles an older OpenBLAS inside this: OPENBLAS_CORETYPE then names the kernels, unless it
    is set already. faiss-cpu's own copy (0.3.15 in faiss-cpu 1.15) takes a Sapphire Rapids Xeon for an SSE3 CPU,
    and its flat search then runs at a quarter of the speed (bench/README.md, "faiss's OpenBLAS"). An OpenBLAS reads
    the variable once, when it loads, so it is removed again afterwards: child processes and libraries loaded later
    make their own choice."""
    name = openblas_coretype()
    if "OPENBLAS_CORETYPE" in os.environ or name is None:
        yield
        return
    os.environ["OPENBLAS_CORETYPE"] = name
    try:
        yield
    finally:
        os.environ.pop("OPENBLAS_CORETYPE", None)
