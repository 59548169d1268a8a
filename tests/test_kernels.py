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
library_preloaded = any(name.startswith("reprolib") for name in sys.modules)
Path("probe.json").write_text(json.dumps({
    "pid": os.getpid(), "cwd": os.getcwd(), "env": os.environ.get("REPROLIB_TEST_ENV"),
    "torch_preloaded": "torch" in sys.modules, "leaked": "marker" in globals(),
    "library_preloaded": library_preloaded,
}))
marker = 1
"""


def make_notebook(path, source, parameters='out_dir = ""'):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}),
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


def kernel_processes(name="reprolib.kernels", token=None):
    """Proxies, zygotes and forked kernels alive now (their command line names reprolib.kernels and, for
    one run's, its zygote's socket); with `token`, only those whose environment holds it: the processes a
    test started, even orphaned, and not those of another run on the machine."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and name.encode() in (proc / "cmdline").read_bytes() and \
                    (token is None or token.encode() in (proc / "environ").read_bytes()):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


@pytest.fixture
def token(monkeypatch):
    """An environment entry that this test's pipeline processes inherit."""
    import uuid

    value = uuid.uuid4().hex
    monkeypatch.setenv("REPROLIB_TEST_TOKEN", value)
    return f"REPROLIB_TEST_TOKEN={value}"


def wait_until_started(marker, timeout_s=120):
    """Until the stage's notebook has written `marker` (its kernel is running the cell)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert marker.exists(), "the stage never started"


def socket_of(zygote_parent):
    """The socket path of the zygote started by process `zygote_parent`."""
    for pid in kernel_processes():
        try:
            if int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1]) == zygote_parent:
                return (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")[4].decode()
        except (OSError, IndexError, ValueError):
            pass
    return None


def test_each_stage_gets_a_fresh_warm_kernel_in_its_directory(tmp_path, monkeypatch, token):
    monkeypatch.setenv("REPROLIB_TEST_ENV", "from the pipeline")
    path = write_pipeline(tmp_path, [{"id": "a", "notebook": "probe"}, {"id": "b", "notebook": "probe"}])

    run_pipeline(path, out_root=tmp_path / "outputs", log=lambda line: None)

    seen = {sid: json.loads((tmp_path / "outputs" / "k" / sid / "probe.json").read_text()) for sid in "ab"}
    assert seen["a"]["pid"] != seen["b"]["pid"]                       # a new process per stage
    assert not seen["b"]["leaked"]                                    # nothing left by stage a
    assert all(s["torch_preloaded"] for s in seen.values())           # forked after the imports
    assert not any(s["library_preloaded"] for s in seen.values())     # reprolib as it is now, not at fork time
    assert [Path(seen[sid]["cwd"]).name for sid in "ab"] == ["a", "b"]
    assert {s["env"] for s in seen.values()} == {"from the pipeline"}
    assert kernel_processes(token=token) == []                        # zygote, proxies and kernels are gone


def test_the_zygote_loads_faiss_with_the_openblas_kernels_named(monkeypatch):
    """Every forked stage's faiss is the zygote's: its OpenBLAS must get the kernels require_faiss names (a quarter
    of the flat-search speed on a Sapphire Rapids Xeon otherwise), and the variable must not reach the stages."""
    from reprolib import cpu

    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    monkeypatch.setattr(cpu, "openblas_coretype", lambda: "Haswell")
    seen = {}
    monkeypatch.setattr(kernels.importlib, "import_module",
                        lambda module: seen.setdefault(module, os.environ.get("OPENBLAS_CORETYPE")))
    kernels._warm_up(("numpy", "faiss", "torch"))
    assert seen == {"numpy": None, "faiss": "Haswell", "torch": None}
    assert "OPENBLAS_CORETYPE" not in os.environ


def test_a_forked_stage_shows_its_figures_in_its_notebook(tmp_path):
    """pyplot is imported in the zygote, before ipykernel names its inline backend: the stage's notebook must
    still hold its figures (the executed notebooks are what a student opens)."""
    path = write_pipeline(tmp_path, [{"id": "a", "notebook": "plot"}])
    make_notebook(tmp_path / "notebooks" / "plot.ipynb",
                  "from reprolib import plots\nplots.recall_curve({'bm25': {1: 0.4, 10: 0.8}});")
    run_pipeline(path, out_root=tmp_path / "outputs", log=lambda line: None)
    executed = nbformat.read(tmp_path / "outputs" / "k" / "a" / "plot.ipynb", as_version=4)
    assert any("image/png" in output.get("data", {}) for output in executed.cells[-1].outputs)


def test_a_second_run_in_the_same_process_forks_its_first_stage_too(tmp_path):
    """With papermill already imported the first stage's proxy starts at once: the zygote must be listening."""
    path = write_pipeline(tmp_path, [{"id": "a", "notebook": "probe"}])
    for out in ("first", "second"):
        run_pipeline(path, out_root=tmp_path / out, log=lambda line: None)
        assert json.loads((tmp_path / out / "k" / "a" / "probe.json").read_text())["torch_preloaded"], out


def test_a_kernel_that_dies_fails_its_stage_and_leaves_nothing(tmp_path, token):
    path = write_pipeline(tmp_path, [{"id": "dies", "notebook": "die"}])

    with pytest.raises(ReprolibError, match=r"stage 'dies' failed: .*; the kernel \(pid \d+\) exited with status 3"):
        run_pipeline(path, out_root=tmp_path / "outputs", log=lambda line: None)

    assert kernel_processes(token=token) == []


def test_a_kernel_killed_like_the_out_of_memory_killer_does_is_named_in_the_error(tmp_path, token):
    """SIGKILL leaves no Python error and no output: only the zygote, the kernel's parent, sees how it ended."""
    path = write_pipeline(tmp_path, [{"id": "oom", "notebook": "killed"}])
    make_notebook(tmp_path / "notebooks" / "killed.ipynb", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")

    with pytest.raises(ReprolibError, match=r"stage 'oom' failed: .*; the kernel \(pid \d+\) was killed by SIGKILL "
                                            r"\(on Linux usually the out-of-memory killer: .*--jobs.*batch_size\)"):
        run_pipeline(path, out_root=tmp_path / "outputs", log=lambda line: None)
    manifest = json.loads((tmp_path / "outputs" / "k" / "manifest.json").read_text())
    assert "was killed by SIGKILL" in manifest["stages"]["oom"]["error"]   # what REPORT.md and `--status` show

    # The rerun dies otherwise (a status the proxy cannot see): the first death's line, still in the appended
    # kernel.log, is not reported as the cause.
    make_notebook(tmp_path / "notebooks" / "killed.ipynb", "import os\nos._exit(0)")
    with pytest.raises(ReprolibError, match="stage 'oom' failed") as failed:
        run_pipeline(path, out_root=tmp_path / "outputs", log=lambda line: None)
    assert "SIGKILL" not in str(failed.value)
    assert kernel_processes(token=token) == []


def test_a_killed_pipeline_leaves_no_kernel_behind(tmp_path):
    """SIGKILL runs no cleanup: the zygote goes when its stdin closes, the running kernel when the zygote goes,
    the proxy when its kernel goes."""
    import signal
    import subprocess
    import time

    path = write_pipeline(tmp_path, [{"id": "slow", "notebook": "probe"}])
    make_notebook(tmp_path / "notebooks" / "probe.ipynb", "import time\nopen('started', 'w').close()\ntime.sleep(120)")
    pipeline = subprocess.Popen([sys.executable, "-m", "reprolib", "run", str(path), "--out", str(tmp_path / "outputs")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_started(tmp_path / "outputs" / "k" / "slow" / "started")
        socket_path = socket_of(pipeline.pid)
        assert socket_path and len(kernel_processes(socket_path)) == 3    # zygote, proxy and kernel are running
    finally:
        pipeline.send_signal(signal.SIGKILL)
        pipeline.wait()
    deadline = time.monotonic() + 30
    while kernel_processes(socket_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not kernel_processes(socket_path)


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


def test_only_kernels_of_this_python_are_forked():
    assert kernels._is_this_python([sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"])
    assert kernels._is_this_python(["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"])
    assert not kernels._is_this_python(["/opt/other/bin/python", "-m", "ipykernel_launcher", "-f", "x"])
    assert not kernels._is_this_python(["R", "--slave", "-e", "IRkernel::main()", "--args", "x"])


def test_another_environment_on_the_same_interpreter_is_not_this_python(tmp_path):
    """A virtual environment's python links to its base interpreter: another environment's (or the base python)
    resolves to the same file, but runs other packages, so its kernels are not forked from this one's zygote."""
    other = tmp_path / "other-venv" / "bin"
    other.mkdir(parents=True)
    (other / "python").symlink_to(os.path.realpath(sys.executable))
    assert not kernels._is_this_python([str(other / "python"), "-m", "ipykernel_launcher", "-f", "x"])
    linked = tmp_path / "this-venv"
    linked.symlink_to(Path(sys.executable).parent)   # this environment's folder by another path is this python
    assert kernels._is_this_python([str(linked / Path(sys.executable).name), "-m", "ipykernel_launcher", "-f", "x"])


def test_closing_a_zygote_that_died_frees_its_pipe_and_reaps_it():
    zygote = kernels.Zygote()
    zygote.process.kill()
    os.waitid(os.P_PID, zygote.process.pid, os.WEXITED | os.WNOWAIT)   # dead, not yet reaped
    zygote.close()
    assert zygote.process.stdin.closed and zygote.process.returncode is not None


@pytest.mark.parametrize("jobs, group", [(1, False), (2, False), (2, True)])
def test_kill_stops_a_run_as_ctrl_c_does(tmp_path, token, jobs, group):
    """`kill PID` (SIGTERM), the usual way to stop a run started in the background (where the shell has set
    SIGINT to be ignored), or a SIGTERM to its whole process group (`timeout`, `kill -- -PGID`): the running stage
    is interrupted, the manifest says so, no kernel is left behind."""
    import signal
    import subprocess
    import time

    path = write_pipeline(tmp_path, [{"id": "slow", "notebook": "probe"},
                                     {"id": "later", "notebook": "probe", "params": {"x": "${stages.slow.out}"}}])
    make_notebook(tmp_path / "notebooks" / "probe.ipynb", "import time\nopen('started', 'w').close()\ntime.sleep(120)",
                  parameters='out_dir = ""\nx = ""')
    command = [sys.executable, "-m", "reprolib", "run", str(path), "--out", str(tmp_path / "out"), "--jobs", str(jobs)]
    # SIGINT ignored, as for `cmd &` in a script; a session of its own, so that its group holds only the run
    pipeline = subprocess.Popen(["sh", "-c", 'trap "" INT; exec "$@"', "sh", *command], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_started(tmp_path / "out" / "k" / "slow" / "started")
        begin = time.monotonic()
        if group:
            os.killpg(pipeline.pid, signal.SIGTERM)
        else:
            pipeline.send_signal(signal.SIGTERM)
        _, err = pipeline.communicate(timeout=60)
    finally:
        pipeline.kill()
        pipeline.wait()
    assert time.monotonic() - begin < 40     # interrupted, not the 120 s sleep
    assert pipeline.returncode == 130 and "interrupted" in err
    stages = json.loads((tmp_path / "out" / "k" / "manifest.json").read_text())["stages"]
    # one stage at a time the pipeline's own papermill call is interrupted; with --jobs the kernel's cell is
    assert stages["slow"]["status"] == "failed" and stages["slow"]["error"] == \
        ("KeyboardInterrupt" if jobs == 1 else "cell 3: KeyboardInterrupt")
    assert stages["later"]["error"] == "not run: the run was interrupted"
    deadline = time.monotonic() + 30
    while kernel_processes(token=token) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert kernel_processes(token=token) == []


def test_a_kernel_that_never_starts_keeps_how_it_died_after_the_last_try(tmp_path, monkeypatch):
    """The tries' own error replaces the last kernel's: it must still say how that kernel ended."""
    from types import SimpleNamespace

    import papermill

    from reprolib import pipeline

    def dies(*args, **kwargs):
        with open(tmp_path / kernels.KERNEL_LOG, "a") as log:
            log.write(f"{kernels.KERNEL_END_PREFIX}(pid 7) exited with status 1\n")
        raise RuntimeError("Kernel died before replying to kernel_info")

    monkeypatch.setattr(papermill, "execute_notebook", dies)
    stage = SimpleNamespace(notebook=tmp_path / "nb.ipynb", kernel="python3")
    with pytest.raises(RuntimeError, match=r"\(3 tries\)") as died:
        pipeline._execute(stage, tmp_path / "out.ipynb", {}, tmp_path)
    assert pipeline._describe(died.value).endswith("(3 tries); the kernel (pid 7) exited with status 1")


@pytest.mark.parametrize("notebook, cause", [("die", r"exited with status 3"), ("killed", r"was killed by SIGKILL")])
def test_without_forked_kernels_how_the_kernel_ended_is_named_too(tmp_path, monkeypatch, notebook, cause):
    """No zygote, no proxy: the kernel is jupyter_client's own child process, and its exit code says how it ended."""
    monkeypatch.setenv("REPROLIB_FORK_KERNELS", "0")
    path = write_pipeline(tmp_path, [{"id": "ends", "notebook": notebook}])
    make_notebook(tmp_path / "notebooks" / "killed.ipynb", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")

    with pytest.raises(ReprolibError, match=rf"stage 'ends' failed: .*; the kernel \(pid \d+\) {cause}"):
        run_pipeline(path, out_root=tmp_path / "outputs", log=lambda line: None)


@pytest.mark.parametrize("error, named", [("DeadKernelError", True), ("Kernel didn't respond in 60 seconds", False)])
def test_a_kernel_that_jupyter_client_stopped_itself_is_not_named_as_the_cause(tmp_path, monkeypatch, error, named):
    """After a start timeout jupyter_client stops the live kernel (SIGINT, SIGTERM, SIGKILL): its exit code then
    tells what jupyter_client did, not why the stage failed."""
    from types import SimpleNamespace

    import papermill
    from nbclient.exceptions import DeadKernelError

    from reprolib import pipeline

    def fails(*args, **kwargs):
        with open(tmp_path / kernels.KERNEL_LOG, "a") as log:   # what the proxy saw, for the timeout too
            log.write(f"{kernels.KERNEL_END_PREFIX}(pid 7) was killed by SIGKILL\n")
        raise DeadKernelError("Kernel died") if error == "DeadKernelError" else RuntimeError(error)

    monkeypatch.setattr(papermill, "execute_notebook", fails)
    monkeypatch.setattr(pipeline, "_process_end", lambda processes: "(pid 7) was killed by SIGKILL")
    stage = SimpleNamespace(notebook=tmp_path / "nb.ipynb", kernel="python3")
    with pytest.raises(RuntimeError) as failed:
        pipeline._execute(stage, tmp_path / "out.ipynb", {}, tmp_path)
    assert ("the kernel (pid 7) was killed by SIGKILL" in pipeline._describe(failed.value)) == named
