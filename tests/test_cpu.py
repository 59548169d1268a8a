"""reprolib.cpu: the CPU's flags, and the OpenBLAS kernels named before faiss loads its own OpenBLAS."""
import os
import subprocess
import sys

import pytest

from reprolib import cpu


def fake_cpuinfo(monkeypatch, flags):
    monkeypatch.setattr(cpu.Path, "read_text", lambda self, *a, **k: f"processor : 0\nflags\t\t: {flags}\n")


def test_cpu_flags_reads_the_flags_line(monkeypatch):
    fake_cpuinfo(monkeypatch, "fpu avx2 fma")
    assert cpu.cpu_flags() == {"fpu", "avx2", "fma"}


def test_cpu_flags_is_empty_where_unknown(monkeypatch):
    def refuse(self, *a, **k):
        raise FileNotFoundError(self)
    monkeypatch.setattr(cpu.Path, "read_text", refuse)
    assert cpu.cpu_flags() == set()
    monkeypatch.setattr(cpu.Path, "read_text", lambda self, *a, **k: "Features : fp asimd\n")   # an ARM CPU
    assert cpu.cpu_flags() == set()


@pytest.fixture
def no_coretype(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "recorded")     # so that monkeypatch puts back what was there, if anything
    monkeypatch.delenv("OPENBLAS_CORETYPE")


@pytest.mark.parametrize("flags, expected", [
    ("avx2 fma avx512f avx512cd avx512bw avx512dq avx512vl amx_bf16", "SkylakeX"),
    ("avx avx2 fma", "Haswell"),
    ("avx2 fma avx512f", "Haswell"),       # AVX-512 without BW/DQ/VL (Knights Landing): not SkylakeX's kernels
    ("sse4_2 avx", None),
])
def test_openblas_gets_the_fastest_kernels_the_cpu_runs_while_a_library_loads(monkeypatch, no_coretype, flags,
                                                                               expected):
    fake_cpuinfo(monkeypatch, flags)
    with cpu.openblas_kernels_named():
        assert os.environ.get("OPENBLAS_CORETYPE") == expected
    assert "OPENBLAS_CORETYPE" not in os.environ        # child processes and later libraries choose for themselves


def test_a_chosen_coretype_is_kept(monkeypatch):
    fake_cpuinfo(monkeypatch, "avx2 fma avx512f avx512cd avx512bw avx512dq avx512vl")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")     # bench/slower_kind.py's, or the user's
    with cpu.openblas_kernels_named():
        assert os.environ["OPENBLAS_CORETYPE"] == "Haswell"
    assert os.environ["OPENBLAS_CORETYPE"] == "Haswell"


def test_faiss_loads_its_openblas_with_the_named_kernels():
    """faiss-cpu's own OpenBLAS (0.3.15) takes a Sapphire Rapids Xeon for an SSE3 CPU when left to itself."""
    pytest.importorskip("faiss")
    pytest.importorskip("threadpoolctl")
    if cpu.openblas_coretype() is None:
        pytest.skip("a CPU without AVX2: OpenBLAS is left to detect it")
    code = ("import os, threadpoolctl\nfrom reprolib.index import require_faiss\nrequire_faiss()\n"
            "print(*sorted({p['architecture'] for p in threadpoolctl.threadpool_info()"
            " if p['internal_api'] == 'openblas' and 'faiss' in p['filepath']}), 'OPENBLAS_CORETYPE' in os.environ)")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    said = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    *loaded, still_set = said.stdout.split()
    assert loaded in ([], [cpu.openblas_coretype()])     # [] where this faiss links no OpenBLAS of its own
    assert still_set == "False"


def test_describe_names_the_speed_flags_and_the_caps_set(monkeypatch):
    monkeypatch.setattr(cpu.Path, "read_text", lambda self, *a, **k:
                        "processor : 0\nmodel name : Some Xeon\nflags : fpu avx2 fma avx512f amx_bf16\n")
    for name in cpu.SIMD_CAPS:
        monkeypatch.delenv(name, raising=False)
    assert cpu.describe() == "Some Xeon (avx2 avx512f amx_bf16)"
    monkeypatch.setenv("OPENBLAS_CORETYPE", "SkylakeX")             # not the cap's value
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu.describe() == "Some Xeon (avx2 avx512f amx_bf16), capped: ONEDNN_MAX_CPU_ISA=AVX2"
