"""bench/seed_runs.py: stages compared on each query's metric averaged over one run folder per seed."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "bench" / "seed_runs.py"


def write_stage(run, stage, tables):
    (run / stage).mkdir(parents=True)
    (run / stage / "per_query.json").write_text(json.dumps(tables))


def test_means_over_runs_then_paired_tests(tmp_path):
    seed1, seed2 = tmp_path / "seed1", tmp_path / "seed2"
    qids = [f"q{i}" for i in range(40)]
    # the method is 0.1 ahead at seed 1 and 0.1 behind at seed 2: a tie on the mean, whatever each seed says
    write_stage(seed1, "method", {"nDCG@10": {q: 0.6 for q in qids}})
    write_stage(seed2, "method", {"nDCG@10": {q: 0.4 for q in qids}})
    for run in (seed1, seed2):
        write_stage(run, "control", {"nDCG@10": {q: 0.5 for q in qids}})
        write_stage(run, "bm25", {"other": {q: 0.3 for q in qids}})
    out = subprocess.run([sys.executable, str(SCRIPT), str(seed1), str(seed2), "method:control", "--loses-at-most",
                          "0.01", "method:bm25/other"], capture_output=True, text=True, check=True).stdout
    assert "method                           0.5000 over 40 queries, 2 runs" in out
    assert "method - control: +0.0000, p 1.0000; loses less than 0.01: p 0.0000" in out
    assert "method - bm25/other: +0.2000, p 0.0001" in out


def test_a_stage_without_the_metric_is_named(tmp_path):
    write_stage(tmp_path / "seed1", "method", {"nDCG@10": {"q1": 0.5}})
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "seed1"), "method:missing"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "missing lacks a per_query.json with nDCG@10" in result.stderr
