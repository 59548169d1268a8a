"""Run a command as on the slower kind of machine: AVX2 only, no AVX-512, no native bf16.

    .venv/bin/python bench/slower_kind.py --check                          # what the caps change here
    .venv/bin/python bench/slower_kind.py .venv/bin/reprolib run params/quickstart.yaml --out outputs/qs_avx2

Our machines differ: some have AVX-512 with native bf16, some only AVX2, where the same stage can take 2-3 times
as long; the time targets are for the slower kind. The libraries on reprolib's hot paths pick their SIMD code when
they load, each capped by an environment variable, so a fast machine can run the slow code paths. What the caps
cannot change (clock, caches, memory bandwidth, another vendor's cores) makes the result an estimate:
bench/README.md, "The slower kind on a fast machine", compares it with the machines that really have only AVX2.
"""
import os
import subprocess
import sys

from reprolib.cpu import SIMD_CAPS

# what each library says it uses, read in a child process started with or without the caps
PROBE = """
import time, numpy, torch, faiss, threadpoolctl
from reprolib.modeling.encoder import resolve_precision
torch.set_num_threads(1)
a, b = torch.randn(512, 384), torch.randn(384, 1536)
def ms(x, y, n=20):
    x @ y
    start = time.perf_counter()
    for _ in range(n):
        x @ y
    return round((time.perf_counter() - start) / n * 1e3, 2)
from numpy._core._multiarray_umath import __cpu_features__ as simd
print({"torch": torch.backends.cpu.get_cpu_capability(), "auto precision": resolve_precision("auto", "cpu"),
       "faiss": faiss.SIMDConfig.get_level_name(), "numpy AVX-512": bool(simd.get("X86_V4")),
       "fp32 matmul ms": ms(a, b), "bf16 matmul ms": ms(a.bfloat16(), b.bfloat16(), 3),
       "OpenBLAS": sorted({p["architecture"] for p in threadpoolctl.threadpool_info() if "architecture" in p})})
"""


def capped_env():
    return {**os.environ, **SIMD_CAPS}


def check():
    """Print what the caps change, from two child processes (each library reads its cap when it loads)."""
    for name, env in (("as is", dict(os.environ)), ("capped", capped_env())):
        probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
        said = probe.stdout.strip() or probe.stderr.strip() or f"exit {probe.returncode}"
        print(f"{name:7s}", said.splitlines()[-1])


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv == ["--check"]:
        check()
        return 0
    try:
        os.execvpe(argv[0], argv, capped_env())
    except OSError as e:
        print(f"slower_kind: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
