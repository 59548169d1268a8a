"""Stage kernels forked from the run's zygote: fresh per stage, warm, in the stage's directory, and never
left behind, also when a kernel dies or the zygote is gone."""
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from reprolib import kernels
from reprolib.errors import ReprolibError
from reprolib.pipeline import run_pipeline

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernels are forked on Linux only")

# Records what a stage's kernel looks like from inside.
PROBE = """\
import json, os, sys
from pathlib import Path
Path("probe.json").write_text(json.dumps({
    "pid": os.getpid(), "cwd": os.getcwd(), "env": os.environ.get("REPROLIB_TEST_ENV"),
    "torch_preloaded": "torch" in sys.modules, "leaked": "marker" in globals(),
}))
marker = 1
"""


def make_notebook(path, source):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell('out_dir = ""', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(source)]
    nbformat.write(nb, path)


def write_pipeline(tmp_path, stages):
    (tmp_path / "notebooks").mkdir(exist_ok=True)
    (tmp_path / "params").mkdir(exist_ok=True)
    make_notebook(tmp_path / "notebooks" / "probe.ipynb", PROBE)
    make_notebook(tmp_path / "notebooks" / "die.ipynb", "import os\nos._exit(3)")
    path = tmp_path / "params" / "p.yaml"
    path.write_text(yaml.safe_dump({"run": "k", "stages": stages}))
    return path


def kernel_processes():
    """Proxies, zygotes and forked kernels alive now (their command line names reprolib.kernels)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"reprolib.kernels" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def test_each_stage_gets_a_fresh_warm_kernel_in_its_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("REPROLIB_TEST_ENV", "from the pipeline")
    path = write_pipeline(tmp_path, [{"id": "a", "notebook": "probe"}, {"id": "b", "notebook": "probe"}])
    before = kernel_processes()

    run_pipeline(path, out_root=tmp_path / "outputs", log=lambda line: None)

    seen = {sid: json.loads((tmp_path / "outputs" / "k" / sid / "probe.json").read_text()) for sid in "ab"}
    assert seen["a"]["pid"] != seen["b"]["pid"]                       # a new process per stage
    assert not seen["b"]["leaked"]                                    # nothing left by stage a
    assert all(s["torch_preloaded"] for s in seen.values())           # forked after the imports
    assert [Path(seen[sid]["cwd"]).name for sid in "ab"] == ["a", "b"]
    assert {s["env"] for s in seen.values()} == {"from the pipeline"}
    assert kernel_processes() == before                               # zygote, proxies and kernels are gone


def test_a_kernel_that_dies_fails_its_stage_and_leaves_nothing(tmp_path):
    path = write_pipeline(tmp_path, [{"id": "dies", "notebook": "die"}])
    before = kernel_processes()

    with pytest.raises(ReprolibError, match="stage 'dies' failed"):
        run_pipeline(path, out_root=tmp_path / "outputs", log=lambda line: None)

    assert kernel_processes() == before


def test_without_a_zygote_the_proxy_is_an_ordinary_kernel(tmp_path, monkeypatch):
    """The zygote died (or never started): stages still run, in kernels that import for themselves."""
    def dead_zygote():
        zygote = kernels.Zygote()
        zygote.close()
        return zygote

    monkeypatch.setattr("reprolib.pipeline.start_zygote", dead_zygote)
    path = write_pipeline(tmp_path, [{"id": "a", "notebook": "probe"}])

    run_pipeline(path, out_root=tmp_path / "outputs", log=lambda line: None)

    seen = json.loads((tmp_path / "outputs" / "k" / "a" / "probe.json").read_text())
    assert Path(seen["cwd"]).name == "a" and not seen["torch_preloaded"]
