"""Notebooks: committed clean, one parameters cell, and each one runs under papermill."""
import json
from pathlib import Path

import pytest

from reprolib.pipeline import load_manifest, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs_and_has_one_parameters_cell(path):
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code), "strip outputs before committing"
    assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in cells) == 1


def _tiny_pipeline(tmp_path):
    text = (ROOT / "params" / "quickstart.yaml").read_text().replace("num_passages: 5000", "num_passages: 1000")
    text = text.replace("notebook: ", f"notebook: {ROOT / 'notebooks'}/")
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def test_quickstart_pipeline_runs_every_notebook_then_skips_and_resumes(tmp_path):
    params, out = _tiny_pipeline(tmp_path), tmp_path / "out"
    logs = []
    manifest = run_pipeline(params, out_root=out, log=logs.append)
    assert [e["status"] for e in manifest["stages"].values()] == ["done"] * 3
    run_dir = out / "quickstart"
    assert (run_dir / "bm25" / "run.trec").stat().st_size > 0
    assert {"recall_at_k.png", "per_query.png"} <= {p.name for p in (run_dir / "bm25").iterdir()}
    assert 0.3 < manifest["stages"]["bm25"]["metrics"]["RR@10"] < 0.9
    assert "Reproduction checks" in (run_dir / "REPORT.md").read_text()

    logs.clear()
    run_pipeline(params, out_root=out, log=logs.append)
    assert sum(line.startswith("skip") for line in logs) == 3

    # A run killed during the bm25 stage leaves it "running"; the next run resumes there.
    manifest = load_manifest(run_dir)
    manifest["stages"]["bm25"]["status"] = "running"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    logs.clear()
    run_pipeline(params, out_root=out, log=logs.append)
    ran = [line for line in logs if line.startswith("▶")]
    assert len(ran) == 1 and "bm25" in ran[0]
