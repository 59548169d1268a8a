"""The papermill pipeline runner: parameters, resume, failures, YAML validation, checks and report."""
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import yaml

from reprolib.errors import ReprolibError
from reprolib.pipeline import (_resolve_params, _run_relative, _stage_hashes, format_status, load_manifest,
                               load_pipeline, plan_pipeline, run_pipeline, save_metrics)
from reprolib.report import check, equivalence_check, format_check, non_inferiority_check, relative_check

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


STEP_PARAMS = """\
out_dir = ""
log_file = ""
record = []
value = 0
# what the tests pass (a stage may only set parameters its notebook declares)
seed = 0
lr = epochs = fp16 = data_dir = files = src = tag = x = y = run_dir = None"""


def make_notebook(path, *cells, params=STEP_PARAMS):
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


def test_plan_says_what_each_stage_would_do_and_why_and_runs_nothing(project, capsys):
    path = write_pipeline(project, [
        {"id": "a", "notebook": "step"},
        {"id": "b", "notebook": "step", "params": {"src": "${stages.a.out}"}},
        {"id": "c", "notebook": "other"},
    ])
    shutil.copy(project / "notebooks" / "step.ipynb", project / "notebooks" / "other.ipynb")
    plan = lambda **kw: [(sid, action, why) for sid, action, why in plan_pipeline(path, out_root=project / "outputs", **kw)]
    assert [action for _, action, _ in plan()] == ["run"] * 3 and not (project / "outputs" / "demo").exists()
    with pytest.raises(ReprolibError, match="--only b: it reads the output of a"):   # as the run would refuse
        plan(only="b")
    run(project, path)
    ran(project)
    manifest = (project / "outputs" / "demo" / "manifest.json").read_text()

    assert {why for _, _, why in plan()} == {"done, parameters and notebook unchanged"}
    a, b, c = plan(sets=["a.value=5"])
    assert a[:2] == ("a", "rerun") and a[2].startswith("parameters changed: value; clears a finished stage (")
    assert b[1:] == ("rerun", b[2]) and b[2].startswith("upstream stage a changed")
    assert c[1] == "skip"
    nb = nbformat.read(project / "notebooks" / "other.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("x = 1"))
    nbformat.write(nb, project / "notebooks" / "other.ipynb")
    assert plan()[2][2].startswith("its notebook's code changed (other.ipynb)")
    assert [action for _, action, _ in plan(from_stage="b")] == ["skip", "rerun", "rerun"]
    assert ran(project) == [] and (project / "outputs" / "demo" / "manifest.json").read_text() == manifest
    from reprolib.cli import main

    assert main(["run", str(path), "--out", str(project / "outputs"), "--plan"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[:2] == ["rerun", "c"]

    _, lines = run(project, path)     # the run itself says why it clears finished work
    assert ran(project) == ["c"]
    assert any(line.startswith("rerun c: its notebook's code changed") for line in lines)


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


def test_a_run_folder_moved_elsewhere_is_still_done(project):
    """Paths inside the run folder are hashed relative to it: a moved (or copied) run reruns nothing, and a stage
    added afterwards reads its upstream's outputs where they lie now."""
    stages = [
        {"id": "a", "notebook": "step"},
        {"id": "b", "notebook": "step", "params": {"src": "${stages.a.out}/x", "files": ["${run.out}", {"y": "${run.out}/y"}]}},
    ]
    path = write_pipeline(project, stages)
    run(project, path)
    assert ran(project) == ["a", "b"]

    shutil.move(project / "outputs", project / "elsewhere")
    lines = []
    run_pipeline(path, out_root=project / "elsewhere", log=lines.append)
    assert ran(project) == []
    assert lines[:2] == ["skip a (done, params unchanged)", "skip b (done, params unchanged)"]
    plan = plan_pipeline(path, out_root=project / "elsewhere", sets=["b.value=3"])
    assert plan[1][:2] == ("b", "rerun") and plan[1][2].startswith("parameters changed: value;")  # the paths did not

    path = write_pipeline(project, stages + [
        {"id": "c", "notebook": "step", "params": {"src": "${stages.a.out}/x", "record": ["src"]}}])
    run_pipeline(path, out_root=project / "elsewhere", log=lines.append)
    assert ran(project) == ["c"]
    seen = json.loads((project / "elsewhere" / "demo" / "c" / "seen.json").read_text())
    assert seen["src"] == str((project / "elsewhere" / "demo" / "a" / "x").resolve())

    # a path outside the run folder is what it names: changing it still reruns
    run_pipeline(path, out_root=project / "elsewhere", sets=[f"c.src={project}/other"], log=lines.append)
    assert ran(project) == ["c"]


def test_only_paths_inside_the_run_folder_are_hashed_relative_to_it(tmp_path):
    run_dir = tmp_path / "demo"
    value = {"run": str(run_dir), "inside": [f"{run_dir}/a/x", {"deep": f"{run_dir}/b/../c"}], "number": 3,
             "neighbour": f"{run_dir}2/z", "leaves": f"{run_dir}/../z", "elsewhere": f"{tmp_path}/data"}
    assert _run_relative(value, run_dir) == {
        "run": "${run.out}", "inside": ["${run.out}/a/x", {"deep": "${run.out}/c"}], "number": 3,
        "neighbour": f"{run_dir}2/z", "leaves": f"{run_dir}/../z", "elsewhere": f"{tmp_path}/data"}


def test_a_run_that_hashed_its_absolute_paths_stays_done(project):
    """Runs recorded until 2026-12-06 hashed the absolute paths: in a folder that has not moved they stay done, and
    their records take the run-relative hashes."""
    path = write_pipeline(project, [
        {"id": "a", "notebook": "step"},
        {"id": "b", "notebook": "step", "params": {"src": "${stages.a.out}/x"}},
    ])
    run(project, path)
    assert ran(project) == ["a", "b"]
    run_dir = (project / "outputs" / "demo").resolve()
    pipeline = load_pipeline(path)
    params = _resolve_params(pipeline, run_dir)
    absolute, relative = _stage_hashes(pipeline, params), _stage_hashes(pipeline, params, run_dir)
    assert absolute != relative
    manifest = load_manifest(run_dir)
    for sid in ("a", "b"):
        manifest["stages"][sid]["params_hash"] = absolute[sid]
    manifest["stages"]["b"]["upstream_hashes"] = {"a": absolute["a"]}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))

    plan = plan_pipeline(path, out_root=project / "outputs", sets=["b.value=3"])
    assert [row[:2] for row in plan] == [("a", "skip"), ("b", "rerun")]
    assert plan[1][2].startswith("parameters changed: value;") and "upstream" not in plan[1][2]
    run(project, path)
    assert ran(project) == []
    manifest = load_manifest(run_dir)
    assert {sid: manifest["stages"][sid]["params_hash"] for sid in ("a", "b")} == relative
    assert manifest["stages"]["b"]["upstream_hashes"] == {"a": relative["a"]}


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


def test_unprintable_character_in_the_yaml_names_its_line(project):
    path = project / "params" / "bad.yaml"
    path.write_text("run: demo\nstages:\n  - id: a\x01\n")
    with pytest.raises(ReprolibError) as info:
        run(project, path)
    assert str(info.value) == f"{path}: invalid YAML at line 3: unacceptable character #x0001"


def test_parameters_cell_is_read_as_ipython_runs_it(project):
    # A magic is IPython, not Python: papermill runs it, so the pipeline reads past it; a typo is one line
    make_notebook(project / "notebooks" / "magic.ipynb", STEP, params="%matplotlib inline\n" + STEP_PARAMS)
    run(project, write_pipeline(project, [{"id": "a", "notebook": "magic", "params": {"value": 3}}]))
    assert ran(project) == ["a"]
    for typo, where in [("\nvalue = (", ", line 8: "), ("\nvalue = '\0'", ": ")]:   # NUL: ValueError before 3.12
        make_notebook(project / "notebooks" / "typo.ipynb", STEP, params=STEP_PARAMS + typo)
        path = write_pipeline(project, [{"id": "a", "notebook": "typo"}])
        with pytest.raises(ReprolibError) as info:
            run(project, path)
        message = str(info.value)
        assert message.startswith(f"{path}: stage 'a': ") and f"typo.ipynb: its parameters cell{where}" in message
        assert "\n" not in message and "None" not in message


@pytest.mark.parametrize("measured, value, tolerance, status", [
    (0.3931, "0.393", 0.005, "OK"),
    (0.3925, "0.393", 0.005, "OK"),      # rounds half up to the printed 0.393
    (0.3924, "0.393", 0.005, "OKISH"),   # just below, within tolerance
    (0.388, "0.393", 0.005, "OKISH"),    # exactly at the tolerance edge
    (0.3879, "0.393", 0.005, "FAIL"),
    (0.3979, "0.393", 0.005, "OKISH"),   # above, within tolerance: OKISH is symmetric, as in Pyserini's 2CR
    (0.45, "0.393", 0.005, "FAIL"),      # far above the paper is no reproduction either
    (0.394, "0.390", 0.0, "FAIL"),       # "0.390" was printed with 3 decimals...
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
    seeded = {**row, "measured": 0.39312, "sd": 0.00204, "seeds": 3, "status": "OK"}
    assert format_check(seeded) == "OK     eval_hn RR@10 = 0.3931 ± 0.0020 (3 seeds) (0.393, RetroMAE README)"
    relative = {"stage": "dense_hn", "metric": "RR@10", "than": "dense", "than_metric": "RR@10", "by": 0.02,
                "alpha": 0.05, "source": "stage 2 beats stage 1", "measured": 0.81, "sd": None, "seeds": 1,
                "reference": 0.74, "difference": 0.07, "p_value": 0.0001, "status": "OK", "note": ""}
    assert format_check(relative) == ("OK     dense_hn RR@10 = 0.8100 (vs dense 0.7400: +0.0700 (>= 0.02), p 0.0001, "
                                      "stage 2 beats stage 1)")


@pytest.mark.parametrize("difference, p_value, by, status", [
    (0.05, 0.001, 0.02, "OK"),
    (0.01, 0.001, 0.02, "OKISH"),    # significant, but by less than claimed
    (0.05, 0.2, 0.02, "FAIL"),       # as large as claimed, but chance could give it
    (-0.05, 0.001, 0.0, "FAIL"),     # significantly worse
    (0.05, None, 0.02, "OKISH"),     # no per-query values: untested
    (0.0, None, 0.0, "FAIL"),        # no better than the control: never a pass
    (0.001, None, 0.0, "OKISH"),
    (-0.001, None, 0.0, "FAIL"),
    (None, None, 0.0, "FAIL"),
])
def test_relative_check(difference, p_value, by, status):
    assert relative_check(difference, p_value, by, alpha=0.05) == status


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


def test_a_plot_stopped_while_it_saves_leaves_the_image_it_had(tmp_path, monkeypatch):
    import matplotlib.figure

    from reprolib import plots

    path = tmp_path / "recall.png"
    plots.recall_curve({"bm25": {1: 0.4, 10: 0.8}}, path=path)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def torn(self, f, **kwargs):
        f.write(b"\x89PNG, half of it")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", torn)
    with pytest.raises(KeyboardInterrupt):
        plots.recall_curve({"bm25": {1: 0.5, 10: 0.9}}, path=path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_a_stages_plots_come_in_the_order_the_notebook_drew_them(tmp_path):
    from reprolib.report import stage_plots

    stage = tmp_path / "finetune"
    (stage / "train").mkdir(parents=True)
    for seconds, name in enumerate(["scores_before.png", "train/loss.png", "scores_after.png"]):
        (stage / name).write_bytes(b"png")
        os.utime(stage / name, ns=(10**9 * (100 + seconds),) * 2)
    assert [p.relative_to(stage).as_posix() for p in stage_plots(tmp_path, "finetune")] == \
        ["scores_before.png", "train/loss.png", "scores_after.png"]


def test_the_report_has_one_metrics_table_per_stage_family():
    from reprolib.report import _metrics_table

    stages = {"bm25": {"RR@10": 0.6, "R@100": 0.9}, "mine": {"miner_R@10": 0.95}, "dense": {"R@100": 0.99, "RR@10": 0.7},
              "finetune": {"train_loss": 0.5}}
    tables = _metrics_table({"stages": {sid: {"metrics": m} for sid, m in stages.items()}}).split("\n\n")
    assert [t.splitlines()[0] for t in tables] == ["| stage | RR@10 | R@100 |", "| stage | miner_R@10 |"]
    assert tables[0].splitlines()[3] == "| dense | 0.7 | 0.99 |" and "| |" not in tables[0]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_report_names_the_commit_of_the_pipelines_checkout(tmp_path):
    from reprolib.report import _git_commit

    assert _git_commit(tmp_path) is None                                  # not a checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "p.yaml").write_text("run: a\n")
    for args in (["init", "-q"], ["add", "p.yaml"], ["commit", "-qm", "x"]):
        subprocess.run(git + args, check=True)
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert _git_commit(tmp_path) == head
    (tmp_path / "p.yaml").write_text("run: b\n")
    assert _git_commit(tmp_path) == f"{head} with uncommitted changes"


def test_checks_and_report(project):
    make_notebook(project / "notebooks" / "plot.ipynb", PLOT, params='out_dir = ""')
    path = write_pipeline(project, [{"id": "eval", "notebook": "plot"}])
    path.write_text(path.read_text() + EXPECTED)

    _, lines = run(project, path)
    checks = ["OK     eval RR@10 = 0.3931 (0.393, RetroMAE README)",
              "FAIL   eval R@1000 = 0.9500 (0.900, paper) [far above the paper: a different metric, data or a leak?]",
              "FAIL   eval MRR = 0.200 (0.35, paper)",
              "FAIL   eval nDCG@10 = missing (0.5, paper)"]
    assert lines[-5:-1] == checks

    run_dir = project / "outputs" / "demo"
    text = (run_dir / "REPORT.md").read_text()
    from reprolib import __version__

    for part in ["# Reproduction report: demo", f"- reprolib {__version__}, commit: ", "- hardware: ", "Python",
                 "| stage | status | wall time (s) |", "| eval | done |",
                 "| stage | RR@10 | R@1000 | MRR |", "| eval | 0.3931 | 0.95 | 0.2 |",
                 "| OK | eval | RR@10 | 0.3931 | paper: 0.393 | +0.0001 | ± 0.005 |  | RetroMAE README |",
                 "| FAIL | eval | nDCG@10 | missing | paper: 0.5 |  | ± 0.01 |  | paper |",
                 "### eval", "![loss](eval/curves/loss.png)"]:
        assert part in text, part
    assert (run_dir / "eval" / "curves" / "loss.png").exists()
    rows = json.loads((run_dir / "checks.json").read_text())
    assert [(r["stage"], r["metric"], r["reference"], r["reference_stage"], r["p_value"], r["status"]) for r in rows] == [
        ("eval", "RR@10", 0.393, None, None, "OK"), ("eval", "R@1000", 0.9, None, None, "FAIL"),
        ("eval", "MRR", 0.35, None, None, "FAIL"), ("eval", "nDCG@10", 0.5, None, None, "FAIL")]
    assert rows[0]["measured"] == 0.39312 and rows[1]["note"].startswith("far above the paper")

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


# A stage that draws 200 per-query hits with probability `quality`, seeded: a method and its control.
SYSTEM = """\
import numpy as np
from reprolib.pipeline import save_metrics, save_per_query

hits = np.random.default_rng([seed, int(quality * 100)]).random(200) < quality
per_query = {f"q{i}": float(h) for i, h in enumerate(hits)}
save_per_query(out_dir, {"RR@10": per_query})
save_metrics(out_dir, {"RR@10": float(hits.mean())})
"""

RELATIVE = """\
seeds: [1, 2, 3]
expected:
  - {stage: method, metric: RR@10, than: control, by: 0.1, source: the method works}
  - {stage: control, metric: RR@10, than: method, source: "swapped, so it must fail"}
  - {stage: same, metric: RR@10, than: control, source: "the control again, so it must fail"}
  - {stage: method, metric: RR@10, than: control, by: 0.5, source: by more than it does}
  - {stage: method, metric: RR@10, value: 0.70, tolerance: 0.15, source: a paper}
  - {stage: same, metric: RR@10, than: control, within: 0.01, source: "the same quality"}
  - {stage: method, metric: RR@10, than: control, within: 0.05, source: "not the same quality"}
  - {stage: same, metric: RR@10, than: control, loses_at_most: 0.1, source: "does not hurt"}
  - {stage: control, metric: RR@10, than: method, loses_at_most: 0.1, source: "loses 0.3, so it must fail"}
"""


def report_lines(lines):
    return [line for line in lines if line.split(" ")[0] in ("OK", "OKISH", "FAIL")]


def test_relative_checks_over_seeds(project):
    make_notebook(project / "notebooks" / "system.ipynb", SYSTEM, params='out_dir = ""\nquality = 0.5\nseed = 0\ntag = None')
    path = write_pipeline(project, [
        {"id": "data", "notebook": "step"},
        {"id": "method", "notebook": "system", "seeded": True, "params": {"quality": 0.8}},
        {"id": "control", "notebook": "system", "seeded": True, "params": {"quality": 0.5}},
        {"id": "same", "notebook": "system", "seeded": True, "params": {"quality": 0.5, "tag": "${stages.data.out}"}},
        {"id": "report", "notebook": "step", "params": {"record": ["run_dir"], "run_dir": "${run.out}"}},
    ], defaults={"record": []})
    path.write_text(path.read_text() + RELATIVE)
    manifest, lines = run(project, path)

    assert list(manifest["stages"]) == ["data", "method_seed1", "method_seed2", "method_seed3", "control_seed1",
                                        "control_seed2", "control_seed3", "same_seed1", "same_seed2", "same_seed3",
                                        "report"]
    run_dir = project / "outputs" / "demo"
    assert json.loads((run_dir / "same_seed2" / "params.json").read_text())["tag"] == str(run_dir / "data")
    assert manifest["stages"]["method_seed2"]["seed"] == 2 and manifest["stages"]["method_seed2"]["base"] == "method"
    rows = json.loads((run_dir / "checks.json").read_text())
    assert [r["status"] for r in rows] == ["OK", "FAIL", "FAIL", "OKISH", "OKISH", "OK", "FAIL", "OK", "FAIL"]
    assert rows[6]["note"] == "differs by more than 0.05" and "(within ±0.01)" in report_lines(lines)[5]
    assert rows[7]["p_value"] < 0.05 and "(> -0.1)" in report_lines(lines)[7]
    assert rows[8]["note"] == "loses more than 0.1"
    method, swapped = rows[0], rows[1]
    assert method["seeds"] == 3 and method["sd"] > 0 and method["reference_stage"] == "control"
    assert method["measured"] == pytest.approx(np.mean([manifest["stages"][f"method_seed{s}"]["metrics"]["RR@10"]
                                                        for s in (1, 2, 3)]))
    assert method["difference"] == pytest.approx(method["measured"] - method["reference"])
    assert method["p_value"] < 0.001 and swapped["note"] == f"worse than {swapped['reference_stage']}"
    assert rows[2]["p_value"] > 0.05
    assert any(line.startswith("OK     method RR@10 = ") and "± " in line and "vs control" in line for line in lines)
    report = (run_dir / "REPORT.md").read_text()
    assert "| OK | method | RR@10 |" in report
    assert list(method["seed_differences"]) == ["1", "2", "3"] and "ahead at 3 of 3 seeds (" in report
    assert "within the margin at 3 of 3 seeds (" in report_lines(lines)[5]     # an equivalence: inside ±within
    first, second = report.index("### method_seed1"), report.index("### method_seed2")
    assert "- OK     method RR@10 = " in report[first:second]            # a seeded stage's checks: under its first copy
    assert "- OK     method RR@10 = " not in report[second:report.index("### control_seed1")]

    # --from a seeded stage starts at its first copy; --seeds replaces the YAML's list
    _, lines = run(project, path, from_stage="control")
    assert [line.split()[2] for line in lines if line.startswith("▶")] == [
        "control_seed1", "control_seed2", "control_seed3", "same_seed1", "same_seed2", "same_seed3", "report"]
    manifest, _ = run(project, path, seeds=[7])
    assert [sid for sid in manifest["stages"] if sid.startswith("method")] == ["method_seed7"]
    # the seeds 1-3 copies were parked, not forgotten: back to the YAML's seeds, only the report reruns
    ran(project)
    _, lines = run(project, path)
    assert [line.split()[2] for line in lines if line.startswith("▶")] == ["report"] and ran(project) == ["report"]
    with pytest.raises(ReprolibError, match="--only method: it runs once per seed; name one copy, e.g. --only method_seed1"):
        run(project, path, only="method")


@pytest.mark.parametrize("entry, problem", [
    ({"stage": "a", "metric": "m", "than": "zz"}, "unknown than 'zz'"),
    ({"stage": "a", "metric": "m", "than": "a"}, "compares a m with itself"),
    ({"stage": "a", "metric": "m", "value": 1, "than": "a"}, "give one of 'value'"),
    ({"stage": "a", "metric": "m"}, "give one of 'value'"),
    ({"stage": "a", "metric": "m", "than": "b", "tolerance": 0.1}, "'tolerance' does not belong in a relative check"),
    ({"stage": "a", "metric": "m", "value": 1, "by": 0.1}, "'by' does not belong in a paper check"),
    ({"stage": "a", "metric": "m", "than": "b", "alpha": 2}, "'alpha' must be a number between 0 and 1"),
    ({"stage": "a", "metric": "m", "than": "b", "within": 0.1, "by": 0.1}, "'by' does not belong in an equivalence"),
    ({"stage": "a", "metric": "m", "than": "b", "within": -1}, "'within' must be a number >= 0"),
    ({"stage": "a", "metric": "m", "than": "b", "loses_at_most": 0.01, "by": 0.1},
     "'by' does not belong in a non-inferiority check"),
    ({"stage": "a", "metric": "m", "than": "b", "loses_at_most": 0.01, "within": 0.1},
     "'loses_at_most' does not belong in an equivalence check"),
    ({"stage": "a", "metric": "m", "than": "b", "loses_at_most": -1}, "'loses_at_most' must be a number >= 0"),
    ({"stage": "a", "metric": "m", "value": 1, "loses_at_most": 0.1}, "'loses_at_most' does not belong in a paper check"),
    ({"stage": "a", "metric": "m", "than": "b", "by": -0.01}, "'by' must be a number >= 0"),
])
def test_expected_validation(project, entry, problem):
    path = write_pipeline(project, [{"id": "a", "notebook": "step"}, {"id": "b", "notebook": "step"}],
                          expected=[entry])
    with pytest.raises(ReprolibError, match=re.escape(problem)):
        run(project, path)


def test_seeds_validation(project):
    path = write_pipeline(project, [{"id": "a", "notebook": "step"}], seeds=[1, 2])
    with pytest.raises(ReprolibError, match="'seeds' given, but no stage is marked 'seeded: true'"):
        run(project, path)
    path = write_pipeline(project, [{"id": "a", "notebook": "step", "seeded": True}], seeds=[1, 1])
    with pytest.raises(ReprolibError, match="'seeds' repeats a seed"):
        run(project, path)
    path = write_pipeline(project, [{"id": "a", "notebook": "step", "seeded": True},
                                    {"id": "r", "notebook": "step", "params": {"x": "${run.out}", "y": "${stages.a.out}"}}],
                          seeds=[1, 2])
    with pytest.raises(ReprolibError, match=r"stage 'r' reads \$\{run.out\}, so it runs once for all seeds: it cannot "
                                            r"be seeded nor name a seeded stage \(stages.a.out\)"):
        run(project, path)


@pytest.mark.parametrize("difference, p_value, status", [
    (0.001, 0.001, "OK"), (0.02, 0.001, "FAIL"), (0.001, 0.3, "FAIL"), (0.001, None, "OKISH"), (0.02, None, "FAIL")])
def test_equivalence_check(difference, p_value, status):
    assert equivalence_check(difference, p_value, within=0.01, alpha=0.05) == status


@pytest.mark.parametrize("difference, p_value, status", [
    (0.05, 0.001, "OK"), (-0.005, 0.01, "OK"), (-0.02, 0.001, "FAIL"), (-0.005, 0.3, "FAIL"), (-0.005, None, "OKISH"),
    (-0.02, None, "FAIL")])
def test_non_inferiority_check(difference, p_value, status):
    assert non_inferiority_check(difference, p_value, margin=0.01, alpha=0.05) == status


PARAMS_DIR = Path(__file__).parent.parent / "params"


@pytest.mark.parametrize("yaml_path", sorted(PARAMS_DIR.rglob("*.yaml")), ids=lambda p: p.relative_to(PARAMS_DIR).as_posix())
def test_every_relative_check_fails_when_the_method_is_replaced_by_its_control(yaml_path, tmp_path):
    """A claim's check must be able to fail. For each relative check of each shipped YAML: a method that wins
    clearly passes, and the same check FAILs when the method's results are the control's (the method does
    nothing) or the two stages swap roles (the method is worse than its control). An equivalence ("trains the
    same") passes on equal results and FAILs on a gap beyond its bound (a broken cross-device gather)."""
    from reprolib.pipeline import load_pipeline
    from reprolib.report import run_checks

    claims = [e for e in load_pipeline(yaml_path).expected if "than" in e]
    # a non-inferiority claim ("does not hurt") passes when the method does nothing; it must fail when it hurts
    rng = np.random.default_rng(0)
    for entry in claims:
        control = rng.uniform(0.2, 0.8, size=2000)
        if "within" in entry:
            apart = control - entry["within"] - 0.02 + rng.normal(0, 0.001, size=2000)
            cases = (((control + rng.normal(0, 0.001, size=2000), control), "OK"), ((apart, control), "FAIL"))
        elif "loses_at_most" in entry:
            loser = np.clip(control - entry["loses_at_most"] - 0.02 + rng.normal(0, 0.02, size=2000), 0, 1.5)
            cases = (((control + rng.normal(0, 0.02, size=2000), control), "OK"), ((loser, control), "FAIL"))
        else:
            winner = np.clip(control + entry["by"] + 0.05 + rng.normal(0, 0.02, size=2000), 0, 1.5)
            cases = (((winner, control), "OK"), ((control, control), "FAIL"), ((control, winner), "FAIL"))
        for roles, expected_status in cases:
            method_values, control_values = roles
            run_dir = tmp_path / f"{entry['stage']}-{expected_status}-{id(roles)}"
            stages = {}
            for sid, metric, values in ((entry["stage"], entry["metric"], method_values),
                                        (entry["than"], entry["than_metric"], control_values)):
                stage = stages.setdefault(sid, {"status": "done", "metrics": {}, "per_query": {}})
                stage["metrics"][metric] = float(values.mean())
                stage["per_query"][metric] = {str(q): float(v) for q, v in enumerate(values)}
            for sid, stage in stages.items():
                (run_dir / sid).mkdir(parents=True)
                (run_dir / sid / "per_query.json").write_text(json.dumps(stage.pop("per_query")))
            manifest = {"stages": stages}
            [row] = run_checks([entry], manifest, run_dir)
            assert row["status"] == expected_status, (yaml_path.name, entry, row)


@pytest.mark.skipif(sys.platform == "win32", reason="no run lock on Windows")
def test_a_long_stage_bar_notes_each_quarter_then_its_final_state(monkeypatch, capsys):
    import importlib

    import reprolib.progress

    monkeypatch.setenv("REPROLIB_STAGE", "1")
    progress = importlib.reload(reprolib.progress)
    try:
        monkeypatch.setattr(progress._StageBar, "LONG", -1.0)   # every bar counts as long
        monkeypatch.setattr(progress._StageBar, "UPDATE_S", 0.0)   # an iterated bar passes on every item
        bar = progress.tqdm(total=8, desc="encode")
        for _ in range(8):
            bar.update(1)
        bar.close()
        lines = capsys.readouterr().out.splitlines()
        assert lines[:3] == ["encode: 2 of 8 after 00:00", "encode: 4 of 8 after 00:00", "encode: 6 of 8 after 00:00"]
        assert lines[3].startswith("encode: 100%|") and len(lines) == 4
        assert list(progress.tqdm(range(8), desc="search")) == list(range(8))   # a bar over an iterable too
        lines = capsys.readouterr().out.splitlines()
        assert lines[:3] == ["search: 2 of 8 after 00:00", "search: 4 of 8 after 00:00", "search: 6 of 8 after 00:00"]
        assert lines[3].startswith("search: 100%|") and len(lines) == 4
    finally:
        monkeypatch.delenv("REPROLIB_STAGE")
        importlib.reload(reprolib.progress)
        logger = logging.getLogger("reprolib")   # the stage's notes handler: not for the rest of the tests
        logger.handlers = [h for h in logger.handlers if not getattr(h, "reprolib_notes", False)]
        logger.propagate = True


def test_a_second_run_on_the_same_folder_is_refused(project):
    """Two runs on one run folder would delete each other's stage folders: the second says who holds it."""
    import fcntl

    path = write_pipeline(project, [{"id": "a", "notebook": "step"}])
    run_dir = project / "outputs" / "demo"
    run_dir.mkdir(parents=True)
    with open(run_dir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        with pytest.raises(ReprolibError, match=r"in use by another `reprolib run` \(pid 4242\)"):
            run(project, path)
    assert ran(project) == []
    run(project, path)                      # released: the next run goes ahead
    assert ran(project) == ["a"]


# ---------------------------------------------------------------- typos are errors, not ignored parameters

@pytest.mark.parametrize("stage_params, sets, message", [
    ({"valeu": 1}, [], "stage 'a': step.ipynb has no parameter 'valeu'; did you mean 'value'?"),
    ({}, ["a.recrod=[]"], "--set 'a.recrod=[]': stage 'a': step.ipynb has no parameter 'recrod'; did you mean 'record'?"),
    ({"zzz": 1}, [], "stage 'a': step.ipynb has no parameter 'zzz'"),
])
def test_a_parameter_the_notebook_does_not_have_is_an_error(project, stage_params, sets, message):
    path = write_pipeline(project, [{"id": "a", "notebook": "step", "params": stage_params}])
    with pytest.raises(ReprolibError) as info:
        run(project, path, sets=sets)
    assert str(info.value).endswith(message)
    assert not (project / "outputs").exists() and ran(project) == []


def test_defaults_reach_only_the_notebooks_that_have_them(project):
    make_notebook(project / "notebooks" / "bare.ipynb", STEP, params='out_dir = ""\nlog_file = ""\nrecord = []\nvalue = 0')
    path = write_pipeline(project, [{"id": "a", "notebook": "step"}, {"id": "b", "notebook": "bare"}],
                          defaults={"seed": 7})
    run(project, path)
    run_dir = project / "outputs" / "demo"
    assert json.loads((run_dir / "a" / "params.json").read_text())["seed"] == 7
    assert "seed" not in json.loads((run_dir / "b" / "params.json").read_text())


def test_a_duplicate_yaml_key_is_an_error(project):
    path = project / "params" / "p.yaml"
    path.write_text("run: demo\nstages:\n  - id: a\n    notebook: step\n    params: {value: 1}\n"
                    "    params: {value: 2}\n")
    with pytest.raises(ReprolibError, match=r"p.yaml: line 6: duplicate key 'params'"):
        run(project, path)


def test_a_bound_check_fails_above_the_bound(tmp_path):
    """`at_most`: e.g. a sparse retriever's non-zeros per passage; a dense-as-sparse index (the whole
    vocabulary) must fail it."""
    from reprolib.report import format_check, run_checks

    entry = {"stage": "index", "metric": "passages_nonzeros_mean", "at_most": 300, "source": "sparse"}
    rows = []
    for values in ([120.0, 180.0, 150.0], [120.0, 4000.0, 150.0], [4000.0] * 3):
        stages = {f"index_seed{i}": {"status": "done", "base": "index", "metrics": {entry["metric"]: v}}
                  for i, v in enumerate(values)}
        [row] = run_checks([entry], {"stages": stages}, tmp_path)
        rows.append(row)
    assert [row["status"] for row in rows] == ["OK", "FAIL", "FAIL"]
    assert format_check(rows[0]) == "OK     index passages_nonzeros_mean = 150.0 ± 30.0 (3 seeds) (<= 300, sparse)"
    assert rows[2]["note"] == "above the bound 300"


def _seeded_stages(tmp_path, means, queries=500):
    """Manifest stages with per-query values around each {base: {seed: mean}}."""
    rng = np.random.default_rng(0)
    stages = {}
    for base, by_seed in means.items():
        for seed, mean in by_seed.items():
            sid = f"{base}_seed{seed}"
            values = np.clip(mean + rng.normal(0, 0.05, size=queries), 0, 1)
            stages[sid] = {"status": "done", "base": base, "seed": seed, "metrics": {"RR@10": float(values.mean())}}
            (tmp_path / sid).mkdir(parents=True)
            (tmp_path / sid / "per_query.json").write_text(json.dumps({"RR@10": dict(enumerate(values.tolist()))}))
    return stages


def test_a_relative_check_shows_each_seed_so_one_lucky_control_seed_is_visible(tmp_path):
    """The paired test averages each query over the seeds: a control that is lucky at one seed can outweigh a
    method that wins at the others (the RetroMAE miniature at seeds 4-6). The mean's FAIL stands and the check
    shows the seeds; a control that ran once (BM25) has no per-seed pairs."""
    from reprolib.report import format_check, run_checks, write_checks

    stages = _seeded_stages(tmp_path, {"method": {4: 0.55, 5: 0.62, 6: 0.68}, "control": {4: 0.50, 5: 0.80, 6: 0.58}})
    stages["bm25"] = {"status": "done", "metrics": {"RR@10": 0.5}}
    entry = {"stage": "method", "metric": "RR@10", "than": "control", "than_metric": "RR@10", "by": 0.01,
             "alpha": 0.05, "source": "the method beats its control"}
    [row, against_bm25] = run_checks([entry, {**entry, "than": "bm25"}], {"stages": stages}, tmp_path)

    assert row["status"] == "FAIL"                  # the mean fails: the seeds that win do not rescue it
    assert list(row["seed_differences"]) == [4, 5, 6]
    assert list(row["seed_differences"].values()) == pytest.approx([0.05, -0.18, 0.10], abs=0.01)
    assert "ahead at 2 of 3 seeds (+0.0" in format_check(row)
    assert "within the margin at 1 of 3 seeds" in format_check({**row, "within": 0.08})
    not_hurt = run_checks([{**entry, "loses_at_most": 0.05}], {"stages": stages}, tmp_path)[0]
    assert "within the margin at 2 of 3 seeds" in format_check(not_hurt)
    assert against_bm25["seed_differences"] is None and "seeds (" not in format_check(against_bm25)
    # BM25 kept no per-query values here: the check says it is untested instead of raising KeyError
    assert against_bm25["status"] == "OKISH" and against_bm25["p_value"] is None
    assert against_bm25["note"] == "no per-query values: not tested for significance"
    written = json.loads(write_checks(tmp_path, [row]).read_text())[0]["seed_differences"]
    assert list(written) == ["4", "5", "6"]


def test_an_ok_must_hold_at_every_seed(tmp_path):
    """A mean carried by one seed is OKISH, not OK: the paired test sees the queries' noise, not the seeds'.
    The same margin won at every seed stays OK, and the control in the method's place still FAILs."""
    from reprolib.report import format_check, run_checks

    entry = {"stage": "method", "metric": "RR@10", "than": "control", "than_metric": "RR@10", "by": 0.02,
             "alpha": 0.05, "source": "the method beats its control"}
    one_seed = _seeded_stages(tmp_path / "a", {"method": {1: 0.50, 2: 0.52, 3: 0.80},     # +0.25 at seed 3 only
                                               "control": {1: 0.52, 2: 0.53, 3: 0.55}})
    every_seed = _seeded_stages(tmp_path / "b", {"method": {1: 0.56, 2: 0.58, 3: 0.62},
                                                 "control": {1: 0.52, 2: 0.53, 3: 0.55}})
    [carried] = run_checks([entry], {"stages": one_seed}, tmp_path / "a")
    [held] = run_checks([entry], {"stages": every_seed}, tmp_path / "b")
    [swapped] = run_checks([{**entry, "stage": "control", "than": "method"}], {"stages": every_seed}, tmp_path / "b")

    assert carried["difference"] > 0.02 and carried["p_value"] < 0.05   # the old rule's OK
    assert carried["status"] == "OKISH" and carried["note"] == "holds on the mean, not at every seed"
    assert "ahead at 1 of 3 seeds" in format_check(carried)
    assert held["status"] == "OK" and "ahead at 3 of 3 seeds" in format_check(held)
    assert swapped["status"] == "FAIL"
    # a check that does not hurt, or an equivalence, must hold within its margin at every seed as well
    [not_hurt] = run_checks([{**entry, "loses_at_most": 0.05}], {"stages": one_seed}, tmp_path / "a")
    assert not_hurt["status"] == "OK"                                   # -0.02 and -0.01 are within 0.05
    [not_hurt] = run_checks([{**entry, "loses_at_most": 0.015}], {"stages": one_seed}, tmp_path / "a")
    assert not_hurt["status"] == "OKISH" and "within the margin at 2 of 3 seeds" in format_check(not_hurt)
    [same] = run_checks([{**entry, "within": 0.1}], {"stages": one_seed}, tmp_path / "a")
    assert same["p_value"] < 0.05 and same["status"] == "OKISH"          # +0.073 on the mean, +0.25 at seed 3


def test_a_bound_check_is_parsed_alone(project):
    from reprolib.pipeline import load_pipeline

    path = write_pipeline(project, [{"id": "a", "notebook": "step"}])
    text = path.read_text()
    path.write_text(text + "expected:\n  - {stage: a, metric: n, at_most: 300, value: 1}\n")
    with pytest.raises(ReprolibError, match="give one of 'value'"):
        load_pipeline(path)
    path.write_text(text + "expected:\n  - {stage: a, metric: n, at_most: 300, by: 1}\n")
    with pytest.raises(ReprolibError, match="'by' does not belong in a bound"):
        load_pipeline(path)
    path.write_text(text + "expected:\n  - {stage: a, metric: n, at_most: 300}\n")
    assert load_pipeline(path).expected[0]["at_most"] == 300


@pytest.mark.skipif(sys.platform == "win32", reason="no run lock on Windows")
def test_two_runs_at_once_on_one_folder(project):
    """Two real `reprolib run` processes on one --out: the second is refused in one line, the first completes."""
    import subprocess
    import time

    make_notebook(project / "notebooks" / "slow.ipynb", "import time\ntime.sleep(6)\n" + STEP)
    path = write_pipeline(project, [{"id": "a", "notebook": "slow"}])
    command = [sys.executable, "-m", "reprolib", "run", str(path), "--out", str(project / "outputs")]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stage_dir = project / "outputs" / "demo" / "a"
    deadline = time.monotonic() + 120
    while not (stage_dir / "params.json").exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    second = subprocess.run(command, capture_output=True, text=True)
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().splitlines()[-1].startswith("error: ") and "in use by another `reprolib run`" in second.stderr
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert ran(project) == ["a"] and load_manifest(project / "outputs" / "demo")["stages"]["a"]["status"] == "done"


def test_a_stage_stores_its_progress_bars_finished_as_text(project):
    """Under the pipeline, reprolib's bars are text on stdout, stored finished: no widget frozen at 0%, no
    red stderr, no 'IProgress not found' warning."""
    make_notebook(project / "notebooks" / "bars.ipynb",
                  "from reprolib.progress import tqdm\nfor _ in tqdm(range(3), desc='work'):\n    pass\n"
                  "from transformers.utils import logging\nfor _ in logging.tqdm(range(3), desc='hf'):\n    pass\n"
                  "import tempfile\nfrom pathlib import Path\nfrom reprolib.data import Corpus\n"
                  "from reprolib.search import bm25_search\ncorpus = Path(tempfile.mkdtemp(), 'corpus.tsv')\n"
                  "corpus.write_text('p1\\tt\\ta cat\\np2\\tt\\ta dog\\n')\n"
                  "bm25_search(Corpus.open(corpus, progress=False), {'q': 'cat'})\n"
                  "import logging\nlogging.getLogger('reprolib.index').warning('index rebuilt')\n"
                  + STEP)
    path = write_pipeline(project, [{"id": "a", "notebook": "bars"}])
    run(project, path)
    executed = nbformat.read(project / "outputs" / "demo" / "a" / "bars.ipynb", as_version=4)
    streams = [o for cell in executed.cells for o in cell.get("outputs", []) if o.output_type == "stream"]
    text = "".join(o.text for o in streams)
    assert "work: 100%" in text and "3/3" in text and "TqdmWarning" not in text
    assert "hf:" not in text   # Hugging Face's own bars are off in stages
    assert "BM25S" not in text and "Tokenize" not in text   # and bm25s's (transient, on stderr)
    assert "note: index rebuilt" in text                      # reprolib's notices: stdout, not a red box
    assert [line for line in text.splitlines() if "work" in line] == [line for line in text.splitlines()
                                                                      if line.startswith("work: 100%")]   # one line
    assert all(o.name == "stdout" for o in streams)
    assert not any(o.output_type == "display_data" for cell in executed.cells for o in cell.get("outputs", []))


# ---- --jobs: stages at once ------------------------------------------------------------------

# A stage that proves it ran beside another: it leaves a file named after itself in `files`, waits up to a
# minute for the file of stage `tag` (if any), sleeps `value` s, and records what it saw and the threads it had.
MEET = """\
import json, os, time
from pathlib import Path
import threadpoolctl, torch

start = time.time()
Path(files, Path(out_dir).name).touch()
while tag and not Path(files, tag).exists() and time.time() < start + 60:
    time.sleep(0.05)
time.sleep(value)
blas = sorted({pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"})
Path("ran.json").write_text(json.dumps({"start": start, "end": time.time(), "met": bool(tag) and Path(files, tag).exists(),
                                        "omp": os.environ.get("OMP_NUM_THREADS"), "torch": torch.get_num_threads(),
                                        "blas": blas}))
"""


def meet_pipeline(project, stages):
    make_notebook(project / "notebooks" / "meet.ipynb", MEET, params=STEP_PARAMS + "\nnum_processes = 1")
    (project / "met").mkdir()
    return write_pipeline(project, stages, defaults={"files": str(project / "met")})


def ran_json(project, sid):
    return json.loads((project / "outputs" / "demo" / sid / "ran.json").read_text())


@pytest.mark.parametrize("fork", ["1", "0"], ids=["forked kernels", "plain kernels"])
def test_jobs_run_independent_stages_at_once_on_their_share_of_the_cores(project, monkeypatch, fork):
    monkeypatch.setenv("REPROLIB_FORK_KERNELS", fork)
    path = meet_pipeline(project, [
        {"id": "a", "notebook": "meet", "params": {"tag": "b"}},
        {"id": "b", "notebook": "meet", "params": {"tag": "a"}},
        {"id": "c", "notebook": "meet", "params": {"x": "${stages.a.out}", "y": "${stages.b.out}"}},
    ])
    manifest, _ = run(project, path, jobs=2)
    seen = {sid: ran_json(project, sid) for sid in "abc"}
    assert seen["a"]["met"] and seen["b"]["met"]                            # a and b ran at the same time
    assert seen["c"]["start"] >= max(seen["a"]["end"], seen["b"]["end"])    # c read both
    cores = len(os.sched_getaffinity(0))
    shares = {"a": max(1, cores // 2), "b": max(1, cores // 2), "c": cores}   # c, left alone, takes every core
    assert {sid: (t["omp"], t["torch"], t["blas"]) for sid, t in seen.items()} == \
        {sid: (str(n), n, [n]) for sid, n in shares.items()}
    assert {sid: manifest["stages"][sid]["threads"] for sid in "abc"} == shares

    _, lines = run(project, path, jobs=2)   # resumes as a plain run does: nothing left to do
    assert [line for line in lines if not line.startswith("report:")] == [f"skip {sid} (done, params unchanged)"
                                                                           for sid in "abc"]


# A kernel that exits at once for its first `deaths` starts, as one does when a port it was given is taken
# before it binds it (jupyter_client picks free TCP ports, closes them, and hands them to the kernel).
FLAKY_KERNEL = """\
import runpy, sys
connection_file, starts, deaths = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(starts, "a") as f:
    f.write("start\\n")
if len(open(starts).read().split()) <= deaths:
    sys.exit("zmq.error.ZMQError: Address already in use")
sys.argv = ["ipykernel_launcher", "-f", connection_file]
runpy.run_module("ipykernel_launcher", run_name="__main__")
"""


@pytest.mark.parametrize("deaths, tries", [(2, 3), (5, 3)], ids=["starts again", "gives up"])
def test_a_kernel_that_dies_before_its_first_cell_is_started_again(project, monkeypatch, deaths, tries):
    spec_dir = project / "jupyter" / "kernels" / "flaky"
    spec_dir.mkdir(parents=True)
    script, starts = project / "flaky.py", project / "starts.log"
    script.write_text(FLAKY_KERNEL)
    argv = [sys.executable, str(script), "{connection_file}", str(starts), str(deaths)]
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "flaky", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(project / "jupyter"))
    nb = nbformat.read(project / "notebooks" / "step.ipynb", as_version=4)
    nb.metadata["kernelspec"] = {"name": "flaky", "display_name": "flaky", "language": "python"}
    nbformat.write(nb, project / "notebooks" / "flaky.ipynb")
    path = write_pipeline(project, [{"id": "a", "notebook": "flaky", "params": {"value": 3}}])

    if deaths < tries:
        manifest, _ = run(project, path)
        assert manifest["stages"]["a"]["metrics"]["value"] == 3
    else:
        # sys.exit("...") is status 1, read from the last kernel's process (a kernelspec of its own: not forked)
        with pytest.raises(ReprolibError, match=r"^stage 'a' failed: RuntimeError: Kernel died before replying to "
                                                r"kernel_info \(3 tries\); the kernel \(pid \d+\) exited with status 1 "
                                                r"\(see .*flaky.ipynb\)$"):
            run(project, path)
        assert load_manifest(project / "outputs" / "demo")["stages"]["a"]["status"] == "failed"
    assert len(starts.read_text().split()) == min(deaths + 1, tries)


def test_a_kernel_too_slow_to_start_is_one_line(project, monkeypatch):
    # jupyter_client's start timeout (a loaded machine) is a RuntimeError of its own: a stage's error, no traceback
    import papermill

    def times_out(*args, **kwargs):
        raise RuntimeError("Kernel didn't respond in 60 seconds")

    monkeypatch.setattr(papermill, "execute_notebook", times_out)
    with pytest.raises(ReprolibError, match=r"^stage 'a' failed: RuntimeError: Kernel didn't respond in 60 seconds "
                                            r"\(see .*step.ipynb"):
        run(project, write_pipeline(project, [STEP_STAGE]))
    assert load_manifest(project / "outputs" / "demo")["stages"]["a"]["status"] == "failed"


def test_jobs_a_stage_runs_alone_only_where_no_other_stage_could_overlap_it():
    """Whether a stage takes every core follows from the stages due in the run and what they read, never from what
    happens to be running when it starts: the same command gets the same threads, and the same numbers."""
    from types import SimpleNamespace

    from reprolib.pipeline import _alone

    def stages(**upstream):
        return [SimpleNamespace(id=sid, upstream=ups) for sid, ups in upstream.items()]

    # data -> a and b side by side -> report: only data and report are alone
    assert _alone(stages(data=[], a=["data"], b=["data"], report=["data", "a", "b"])) == {"data", "report"}
    # c reads a only: b may overlap it, however soon b ends; d reads c and b
    assert _alone(stages(a=[], b=[], c=["a"], d=["c", "b"])) == {"d"}
    # a rerun of the stages after `done` (not in the list): what they read there orders nothing
    assert _alone(stages(a=["done"], b=["done"])) == set()
    assert _alone(stages(a=["done"], b=["a", "done"])) == {"a", "b"}
    # the quickstart: BM25 runs beside the first fine-tuning, so only its first and last stages are alone
    from reprolib.pipeline import load_pipeline
    assert _alone(load_pipeline(PARAMS_DIR / "quickstart.yaml").stages) == {"data", "report"}


def test_jobs_a_stage_of_two_processes_takes_two_slots(project):
    path = meet_pipeline(project, [
        {"id": "two", "notebook": "meet", "params": {"num_processes": 2, "value": 1}},
        {"id": "b", "notebook": "meet", "params": {"tag": "c", "value": 1}},
        {"id": "c", "notebook": "meet", "params": {"tag": "b", "value": 1}},
    ])
    manifest, _ = run(project, path, jobs=2)
    seen = {sid: ran_json(project, sid) for sid in ("two", "b", "c")}
    assert seen["b"]["met"] and seen["c"]["met"]
    assert seen["two"]["end"] <= min(seen["b"]["start"], seen["c"]["start"])   # it ran alone (YAML order: first)
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert manifest["stages"]["two"]["threads"] == threads   # per process: 2 slots of cores/2, over 2 processes


def test_jobs_after_a_failure_the_running_stages_finish_and_none_starts(project):
    make_notebook(project / "notebooks" / "boom.ipynb",
                  "from pathlib import Path\nPath(files, 'boom').touch()\nraise ValueError('bad value')")
    path = meet_pipeline(project, [
        {"id": "slow", "notebook": "meet", "params": {"tag": "boom", "value": 2}},   # ends 2 s after boom fails
        {"id": "boom", "notebook": "boom"},
        {"id": "after", "notebook": "step", "params": {"x": "${stages.slow.out}"}},
    ])
    with pytest.raises(ReprolibError, match=r"^stage 'boom' failed in cell 3: ValueError: bad value"):
        run(project, path, jobs=2)
    manifest = load_manifest(project / "outputs" / "demo")
    assert {sid: entry["status"] for sid, entry in manifest["stages"].items()} == \
        {"slow": "done", "boom": "failed", "after": "skipped"}
    assert manifest["stages"]["after"]["error"] == "not run: stage 'boom' failed"
    assert ran_json(project, "slow")["met"]


def test_jobs_must_be_a_positive_whole_number(project, capsys):
    path = write_pipeline(project, [STEP_STAGE])
    with pytest.raises(ReprolibError, match="--jobs 0: the number of stages run at once must be a whole number"):
        run(project, path, jobs=0)
    from reprolib.cli import main
    assert main(["run", str(path), "--jobs", "two"]) == 2
    assert "--jobs: expected a whole number of stages, at least 1, got 'two'" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to oneself")
def test_jobs_ctrl_c_interrupts_every_running_stage(project):
    import signal
    import threading
    import time

    make_notebook(project / "notebooks" / "long.ipynb", "import pathlib, time\npathlib.Path('started').touch()\ntime.sleep(60)")
    path = write_pipeline(project, [
        {"id": "a", "notebook": "long"},
        {"id": "b", "notebook": "long"},
        {"id": "c", "notebook": "step", "params": {"x": "${stages.a.out}"}},
    ])
    run_dir = project / "outputs" / "demo"

    def interrupt_once_both_sleep():
        while not all((run_dir / sid / "started").exists() for sid in "ab"):
            time.sleep(0.1)
        time.sleep(1)
        # to the main thread, where a terminal's Ctrl-C lands: os.kill from this thread may be taken by this thread,
        # and then nothing wakes the main thread's wait
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    # Ctrl-C as a terminal delivers it, whatever an earlier test left as this process's SIGINT handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_once_both_sleep, daemon=True).start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            run(project, path, jobs=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 50   # not the 60 s sleeps
    stages = load_manifest(run_dir)["stages"]
    assert {sid: entry["status"] for sid, entry in stages.items()} == {"a": "failed", "b": "failed", "c": "skipped"}
    assert stages["a"]["error"] == stages["b"]["error"] == "cell 3: KeyboardInterrupt"
    assert stages["c"]["error"] == "not run: the run was interrupted"
