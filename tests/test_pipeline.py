"""The papermill pipeline runner: parameters, resume, failures, YAML validation, checks and report."""
import json
import sys

import nbformat
import numpy as np
import pytest
import yaml

from reprolib.errors import ReprolibError
from reprolib.pipeline import format_status, load_manifest, run_pipeline, save_metrics
from reprolib.report import check, format_check

# Every stage of the tests runs this notebook: it logs its stage id to `log_file` (so a test
# sees which stages ran), dumps the variables named in `record`, and saves metrics.
STEP = """\
import json, os, sys
from pathlib import Path
from reprolib.pipeline import save_metrics

with open(log_file, "a") as f:
    f.write(Path(out_dir).name + "\\n")
seen = {name: globals()[name] for name in record}
seen.update(cwd=os.getcwd(), prefix=sys.prefix)
Path("seen.json").write_text(json.dumps(seen))
save_metrics(out_dir, {"value": value, "found_partial": int(Path("partial.ckpt").exists())})
"""


def make_notebook(path, *cells, params='out_dir = ""\nlog_file = ""\nrecord = []\nvalue = 0'):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(source) for source in cells]
    nbformat.write(nb, path)


@pytest.fixture
def project(tmp_path):
    """params/ and notebooks/ side by side (the default notebook_dir), outputs/ for runs."""
    (tmp_path / "params").mkdir()
    (tmp_path / "notebooks").mkdir()
    make_notebook(tmp_path / "notebooks" / "step.ipynb", STEP)
    return tmp_path


def write_pipeline(project, stages, defaults=(), **top):
    spec = {"run": "demo", "defaults": {"log_file": str(project / "ran.log"), **dict(defaults)}, "stages": stages, **top}
    path = project / "params" / "p.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def ran(project):
    """Stage ids executed since the last call, in order."""
    log = project / "ran.log"
    ids = log.read_text().split() if log.exists() else []
    log.unlink(missing_ok=True)
    return ids


def run(project, path, **kwargs):
    lines = []
    manifest = run_pipeline(path, out_root=project / "outputs", log=lines.append, **kwargs)
    return manifest, lines


def test_params_reach_the_notebook(project):
    record = ["seed", "lr", "epochs", "fp16", "data_dir", "files", "out_dir"]
    path = write_pipeline(project, [
        {"id": "data", "notebook": "step", "params": {"lr": 0.2}},
        {"id": "train", "notebook": "step.ipynb", "params": {
            "lr": 0.3, "epochs": 1, "data_dir": "${stages.data.out}/corpus",
            "files": ["${stages.data.out}/a.tsv", {"run": "${run.out}", "here": "${params.dir}/x"}], "record": record}},
    ], defaults={"seed": 42, "lr": 0.1})

    manifest, lines = run(project, path, sets=["train.epochs=3", "train.fp16=true"])

    run_dir = (project / "outputs" / "demo").resolve()
    data_dir, train_dir = run_dir / "data", run_dir / "train"
    expected = {"seed": 42, "lr": 0.3, "epochs": 3, "fp16": True, "data_dir": f"{data_dir}/corpus",
                "files": [f"{data_dir}/a.tsv", {"run": str(run_dir), "here": f"{path.resolve().parent}/x"}],
                "out_dir": str(train_dir)}
    params = json.loads((train_dir / "params.json").read_text())
    assert {k: params[k] for k in expected} == expected
    seen = json.loads((train_dir / "seen.json").read_text())  # written by the notebook, relative to its cwd
    assert {k: seen[k] for k in expected} == expected
    assert seen["cwd"] == str(train_dir)
    assert seen["prefix"] == sys.prefix  # the kernel runs the interpreter of this venv
    assert json.loads((data_dir / "params.json").read_text())["lr"] == 0.2
    assert (train_dir / "step.ipynb").exists() and (train_dir / "metrics.json").exists()
    assert [e["status"] for e in manifest["stages"].values()] == ["done", "done"]
    assert manifest["stages"]["train"]["metrics"] == {"value": 0, "found_partial": 0}
    assert "▶ stage data (step.ipynb)" in lines and any(line.startswith("✓ train ") for line in lines)
    assert load_manifest(run_dir) == manifest


def test_resume_rerun_force_from_only(project):
    path = write_pipeline(project, [
        {"id": "a", "notebook": "step"},
        {"id": "b", "notebook": "step", "params": {"src": "${stages.a.out}"}},
        {"id": "c", "notebook": "step"},
    ])
    run(project, path)
    assert ran(project) == ["a", "b", "c"]

    _, lines = run(project, path)
    assert ran(project) == []
    assert lines[:3] == [f"skip {s} (done, params unchanged)" for s in "abc"]

    # a new param reruns that stage and the stages reading its output, in clean stage dirs
    stray = project / "outputs" / "demo" / "b" / "stray.txt"
    stray.write_text("old")
    changed = ["a.value=5"]
    manifest, _ = run(project, path, sets=changed)
    assert ran(project) == ["a", "b"] and not stray.exists()
    assert manifest["stages"]["a"]["metrics"]["value"] == 5

    # editing prose leaves the hash alone; code cells are what count
    nb = nbformat.read(project / "notebooks" / "step.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("More explanation."))
    nbformat.write(nb, project / "notebooks" / "step.ipynb")
    run(project, path, sets=changed)
    assert ran(project) == []

    run(project, path, sets=changed, force=True)
    assert ran(project) == ["a", "b", "c"]
    run(project, path, sets=changed, from_stage="b")
    assert ran(project) == ["b", "c"]
    manifest, _ = run(project, path, sets=changed, only="a")
    assert ran(project) == ["a"]
    assert all(e["status"] == "done" for e in manifest["stages"].values())


def test_a_stage_given_the_run_dir_reruns_after_any_earlier_stage(project):
    """The report reads every stage's outputs through ${run.out}: a rerun anywhere before it reruns it."""
    path = write_pipeline(project, [
        {"id": "a", "notebook": "step"},
        {"id": "b", "notebook": "step"},
        {"id": "report", "notebook": "step", "params": {"src": "${run.out}"}},
        {"id": "after", "notebook": "step"},
    ])
    run(project, path)
    assert ran(project) == ["a", "b", "report", "after"]
    run(project, path, sets=["b.value=1"])
    assert ran(project) == ["b", "report"]
    run(project, path, sets=["b.value=1", "after.value=2"])
    assert ran(project) == ["after"]


def test_only_needs_its_upstream_done(project):
    path = write_pipeline(project, [
        {"id": "a", "notebook": "step"},
        {"id": "b", "notebook": "step", "params": {"src": "${stages.a.out}"}},
    ])
    with pytest.raises(ReprolibError, match="--only b: it reads the output of a"):
        run(project, path, only="b")
    assert ran(project) == []


def test_killed_stage_resumes_in_its_dir(project):
    path = write_pipeline(project, [{"id": "a", "notebook": "step"}, {"id": "b", "notebook": "step"}])
    run(project, path)
    assert ran(project) == ["a", "b"]

    # simulate a kill mid-stage: the manifest still says running, a checkpoint is left behind
    run_dir = project / "outputs" / "demo"
    manifest = load_manifest(run_dir)
    manifest["stages"]["b"]["status"] = "running"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    (run_dir / "b" / "partial.ckpt").write_text("step 100")

    manifest, _ = run(project, path)
    assert ran(project) == ["b"]
    assert manifest["stages"]["b"]["metrics"]["found_partial"] == 1  # the notebook saw its checkpoint
    assert manifest["stages"]["b"]["status"] == "done"


def test_failing_cell_stops_the_run(project):
    make_notebook(project / "notebooks" / "boom.ipynb", "x = 1", "raise ValueError(f'bad value {7}')")
    path = write_pipeline(project, [
        {"id": "a", "notebook": "step"},
        {"id": "boom", "notebook": "boom"},
        {"id": "c", "notebook": "step"},
    ])
    with pytest.raises(ReprolibError) as info:
        run(project, path)
    executed = (project / "outputs" / "demo" / "boom" / "boom.ipynb").resolve()
    # cell 4: parameters (1), papermill's injected parameters (2), x = 1 (3), then the raise
    assert str(info.value) == f"stage 'boom' failed in cell 4: ValueError: bad value 7 (see {executed})"
    assert executed.exists()
    assert ran(project) == ["a"]

    manifest = load_manifest(project / "outputs" / "demo")
    statuses = {sid: e["status"] for sid, e in manifest["stages"].items()}
    assert statuses == {"a": "done", "boom": "failed", "c": "skipped"}
    assert manifest["stages"]["boom"]["error"] == "cell 4: ValueError: bad value 7"
    assert not (project / "outputs" / "demo" / "c").exists()
    assert "| boom | failed |" in (project / "outputs" / "demo" / "REPORT.md").read_text()


STEP_STAGE = {"id": "a", "notebook": "step"}


@pytest.mark.parametrize("top, sets, problem", [
    ({"stages": None}, [], "missing 'stages'"),
    ({"stages": [STEP_STAGE, STEP_STAGE]}, [], "duplicate stage id 'a'"),
    ({"stages": [{"id": "a", "notebook": "nope"}]}, [], "stage 'a': notebook not found: "),
    ({"stages": [{**STEP_STAGE, "param": {}}]}, [], "stages[0]: unknown key 'param'"),
    ({"stages": [{**STEP_STAGE, "params": {"x": "${stages.zz.out}"}}]}, [], "stage 'a' references unknown stage 'zz'"),
    ({"stages": [{**STEP_STAGE, "params": {"x": ["${stages.b.out}"]}}, {"id": "b", "notebook": "step"}]}, [],
     "stage 'a' references stage 'b', which does not run before it"),
    ({"stages": [{**STEP_STAGE, "params": {"x": "${stages.a.out}"}}]}, [], "which does not run before it"),
    ({"stages": [{**STEP_STAGE, "params": {"x": "${foo}"}}]}, [], "unknown reference ${foo}"),
    ({"stages": [STEP_STAGE], "expected": [{"stage": "zz", "metric": "m", "value": 1}]}, [],
     "expected[0]: unknown stage 'zz'"),
    ({"stages": [STEP_STAGE], "expected": [{"stage": "a", "metric": "m", "value": "high"}]}, [],
     "expected[0]: 'value' must be a number"),
    ({"stages": [STEP_STAGE]}, ["zz.x=1"], "--set 'zz.x=1': "),
    ({"stages": [STEP_STAGE]}, ["a.value"], "--set 'a.value': expected stage.key=value"),
    ({"stages": [STEP_STAGE]}, ["value=3"], "--set 'value=3': expected stage.key=value"),
])
def test_yaml_validation(project, top, sets, problem):
    path = write_pipeline(project, **top)
    with pytest.raises(ReprolibError) as info:
        run(project, path, sets=sets)
    message = str(info.value)
    assert problem in message and "\n" not in message
    if not sets:
        assert message.startswith(f"{path}: ")
    assert not (project / "outputs").exists()


def test_yaml_syntax_and_missing_file(project):
    path = project / "params" / "bad.yaml"
    path.write_text("run: demo\nstages: [\n")
    with pytest.raises(ReprolibError, match=r"bad.yaml: invalid YAML at line \d+"):
        run(project, path)
    with pytest.raises(ReprolibError, match="missing.yaml: pipeline file not found"):
        run(project, project / "params" / "missing.yaml")
    ok = write_pipeline(project, [STEP_STAGE])
    with pytest.raises(ReprolibError, match="--from zz: .* has no such stage"):
        run(project, ok, from_stage="zz")


@pytest.mark.parametrize("measured, value, tolerance, status", [
    (0.3931, "0.393", 0.005, "OK"),
    (0.3925, "0.393", 0.005, "OK"),      # rounds half up to the printed 0.393
    (0.3924, "0.393", 0.005, "OKISH"),   # just below, within tolerance
    (0.388, "0.393", 0.005, "OKISH"),    # exactly at the tolerance edge
    (0.3879, "0.393", 0.005, "FAIL"),
    (0.45, "0.393", 0.005, "OKISH"),     # above the paper
    (0.394, "0.390", 0.0, "OKISH"),      # "0.390" was printed with 3 decimals...
    (0.394, 0.39, 0.0, "OK"),            # ...but the float 0.39 has only 2
    (39.26, "39.3", 0.2, "OK"),
    (39, "39", 0, "OK"),
    (None, "0.393", 0.005, "FAIL"),
    (float("nan"), "0.393", 0.005, "FAIL"),
])
def test_check(measured, value, tolerance, status):
    assert check(measured, value, tolerance) == status


def test_format_check():
    row = {"stage": "eval_hn", "metric": "RR@10", "value": "0.393", "tolerance": 0.005, "source": "RetroMAE README"}
    assert format_check({**row, "measured": 0.39312, "status": "OK"}) == "OK     eval_hn RR@10 = 0.3931 (0.393, RetroMAE README)"
    assert format_check({**row, "measured": None, "status": "FAIL"}) == "FAIL   eval_hn RR@10 = missing (0.393, RetroMAE README)"


PLOT = """\
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from pathlib import Path
from reprolib.pipeline import save_metrics

Path("curves").mkdir()
plt.plot([3, 2, 1])
plt.savefig("curves/loss.png")
save_metrics(out_dir, {"RR@10": 0.39312, "R@1000": 0.95, "MRR": 0.2})
"""

EXPECTED = """\
expected:
  - {stage: eval, metric: RR@10, value: 0.393, tolerance: 0.005, source: RetroMAE README}
  - {stage: eval, metric: R@1000, value: 0.900, tolerance: 0.01, source: paper}
  - {stage: eval, metric: MRR, value: 0.35, tolerance: 0.01, source: paper}
  - {stage: eval, metric: nDCG@10, value: 0.5, tolerance: 0.01, source: paper}
"""


def test_checks_and_report(project):
    make_notebook(project / "notebooks" / "plot.ipynb", PLOT, params='out_dir = ""')
    path = write_pipeline(project, [{"id": "eval", "notebook": "plot"}])
    path.write_text(path.read_text() + EXPECTED)

    _, lines = run(project, path)
    checks = ["OK     eval RR@10 = 0.3931 (0.393, RetroMAE README)",
              "OKISH  eval R@1000 = 0.9500 (0.900, paper)",
              "FAIL   eval MRR = 0.200 (0.35, paper)",
              "FAIL   eval nDCG@10 = missing (0.5, paper)"]
    assert lines[-5:-1] == checks

    run_dir = project / "outputs" / "demo"
    text = (run_dir / "REPORT.md").read_text()
    for part in ["# Reproduction report: demo", "- commit: ", "- hardware: ", "Python",
                 "| stage | status | wall time (s) |", "| eval | done |",
                 "| stage | RR@10 | R@1000 | MRR |", "| eval | 0.3931 | 0.95 | 0.2 |",
                 "| OK | eval | RR@10 | 0.3931 | 0.393 | 0.005 | RetroMAE README |",
                 "| FAIL | eval | nDCG@10 | missing | 0.5 | 0.01 | paper |",
                 "### eval", "![loss](eval/curves/loss.png)"]:
        assert part in text, part
    assert (run_dir / "eval" / "curves" / "loss.png").exists()

    # all stages skipped: the checks are still printed and the report rewritten
    (run_dir / "REPORT.md").unlink()
    _, lines = run(project, path)
    assert lines[0] == "skip eval (done, params unchanged)" and lines[-5:-1] == checks
    assert (run_dir / "REPORT.md").exists()

    status = format_status(run_dir)
    assert "eval" in status and "done" in status and "RR@10=0.3931 R@1000=0.95 MRR=0.2" in status


def test_status_without_manifest(tmp_path):
    with pytest.raises(ReprolibError, match="no manifest.json here"):
        format_status(tmp_path)


def test_save_metrics_merges_numbers(tmp_path):
    save_metrics(tmp_path, {"loss": np.float32(0.5), "steps": np.int64(10)})
    save_metrics(tmp_path, {"loss": 0.25, "RR@10": 0.3})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"loss": 0.25, "steps": 10, "RR@10": 0.3}
    for bad in ("high", True, None, [1]):
        with pytest.raises(ReprolibError, match="metric 'x' must be a number"):
            save_metrics(tmp_path, {"x": bad})
