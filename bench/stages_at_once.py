"""Benchmark: a whole pipeline with one stage at a time against `--jobs N` stages at once.

    .venv/bin/python bench/stages_at_once.py params/quickstart.yaml --jobs 2     # -> results/stages_at_once_<run>.json
    .venv/bin/python bench/stages_at_once.py params/miniature/tevatron_openmatch.yaml \
        --summarize 1=outputs/tev 2=outputs/tev_j2@1095                          # runs already made, not rerun

Each side runs `reprolib run PARAMS --jobs J` into a fresh folder of its own (so nothing is skipped), and the
result records its wall time, the sum of its stages' times (manifest `wall_s`, what a stage took while sharing
the machine) and every check with its status, so a reader sees both the time saved and whether the verdicts
held. Thread counts change floating-point sums, so the two sides' numbers differ a little; the checks should not.

`--summarize J=RUN_ROOT[@WALL_S] ...` reads runs made earlier with `reprolib run ... --out RUN_ROOT --jobs J`,
with the command's wall time where it was measured; otherwise `wall_s_from_timestamps`, the span from the first
stage's start to the last stage's end, which is the wall time only when one command made the whole run.
"""
import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import REPO, RESULTS, header, write_json


def run(params, jobs, out_root):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "reprolib", "run", str(params), "--out", str(out_root), "--jobs", str(jobs)],
                   check=True, cwd=REPO)
    return round(time.perf_counter() - start, 1)


def summarize(out_root, jobs, wall_s=None):
    run_dir = next(Path(out_root).glob("*/manifest.json")).parent
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    checks = json.loads((run_dir / "checks.json").read_text())
    side = {"jobs": jobs, "run_dir": str(run_dir), "stages": len(stages),
            "stage_s_sum": round(sum(entry["wall_s"] or 0 for entry in stages.values()), 1),
            "checks": [{key: check.get(key) for key in ("stage", "metric", "reference_stage", "measured", "reference",
                                                        "difference", "p_value", "status")} for check in checks]}
    if wall_s is not None:
        side["wall_s"] = wall_s
    else:
        times = [datetime.datetime.fromisoformat(entry[key]) for entry in stages.values()
                 for key in ("started", "finished") if entry.get(key)]
        side["wall_s_from_timestamps"] = (max(times) - min(times)).total_seconds()
    return side


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params", help="a pipeline YAML")
    parser.add_argument("--jobs", type=int, default=2, help="the concurrent side's --jobs (default 2)")
    parser.add_argument("--summarize", nargs="+", metavar="J=RUN_ROOT[@WALL_S]", help="read these runs instead of running")
    parser.add_argument("--out", help="the JSON (default: results/stages_at_once_<run>.json)")
    parser.add_argument("--note", help="a sentence kept in the JSON (e.g. how the summarized runs were made)")
    args = parser.parse_args()

    result = header("stages_at_once")
    result["params"] = args.params
    if args.note:
        result["note"] = args.note
    if args.summarize:
        result.pop("load_average_at_start")   # of the machine now, not when those runs were made
        result["sides"] = []
        for item in args.summarize:
            jobs, root = item.split("=", 1)
            root, _, wall = root.partition("@")
            result["sides"].append(summarize(root, int(jobs), float(wall) if wall else None))
    else:
        with tempfile.TemporaryDirectory(prefix="stages-at-once-") as tmp:
            result["sides"] = []
            for jobs in (1, args.jobs):
                root = Path(tmp) / f"jobs{jobs}"
                result["sides"].append(summarize(root, jobs, run(args.params, jobs, root)))
    run_name = Path(result["sides"][0]["run_dir"]).name
    write_json(args.out or RESULTS / f"stages_at_once_{run_name}.json", result)
    for side in result["sides"]:
        wall = side.get("wall_s", side.get("wall_s_from_timestamps"))
        verdicts = " ".join(check["status"] for check in side["checks"])
        print(f"--jobs {side['jobs']}: wall {wall} s, stages {side['stage_s_sum']} s, checks {verdicts}")


if __name__ == "__main__":
    main()
