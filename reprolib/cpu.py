"""What this machine's CPU can do, read from /proc/cpuinfo (Linux; elsewhere nothing is known)."""
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

# OpenBLAS's kernels by the instructions they need, fastest first
OPENBLAS_CORETYPES = (("SkylakeX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}),
                      ("Haswell", {"avx2", "fma"}))


def cpu_flags():
    """The CPU's feature flags as the kernel reports them (avx2, avx512f, amx_bf16, ...); empty where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "flags :")
    return set(line.split(":", 1)[1].split())


def describe():
    """The CPU model and its SPEED_FLAGS, with the SIMD_CAPS set in this process (for REPORT.md); None where
    /proc/cpuinfo is not there."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 "CPU")
    flags = cpu_flags()
    line = f"{model} ({' '.join(f for f in SPEED_FLAGS if f in flags) or 'no AVX2'})"
    capped = [f"{name}={value}" for name, value in SIMD_CAPS.items() if os.environ.get(name) == value]
    return line + (f", capped: {' '.join(capped)}" if capped else "")


def name_openblas_kernels():
    """Set OPENBLAS_CORETYPE, unless it is set, to the fastest OpenBLAS kernels this CPU runs. Call it before a
    library that bundles an older OpenBLAS loads: faiss-cpu's own copy (0.3.15 in faiss-cpu 1.15) takes a
    Sapphire Rapids Xeon for an SSE3 CPU, and its flat search then runs 5x slower (bench/README.md, "faiss's
    OpenBLAS"). Each OpenBLAS reads the variable once, when it loads; the ones already loaded keep their choice."""
    if "OPENBLAS_CORETYPE" in os.environ:
        return
    flags = cpu_flags()
    name = next((name for name, needs in OPENBLAS_CORETYPES if needs <= flags), None)
    if name:
        os.environ["OPENBLAS_CORETYPE"] = name
