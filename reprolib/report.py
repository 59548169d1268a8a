"""Reproduction checks (measured metric vs the paper's number) and the run's REPORT.md."""
import datetime
import math
import os
import platform
import re
import subprocess
import textwrap
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from urllib.parse import quote

from reprolib.fileio import atomic_write

REPORT = "REPORT.md"
RETRIEVAL_METRIC = re.compile(r"(^|_)(RR|MRR|nDCG|R|P|AP|MAP|Success)(@\d+)?$", re.IGNORECASE)


# ---- checks -------------------------------------------------------------------------------

def check(measured, value, tolerance):
    """"OK" | "OKISH" | "FAIL" for a higher-is-better metric against the paper's `value`.

    OK: `measured` rounds (half up) to `value` at the precision the paper printed. Pass `value`
    as the text written in the YAML ("0.390"), because a float forgets trailing zeros (0.39).
    OKISH: within `tolerance` below `value`, or anywhere above it. FAIL: otherwise, or missing.
    """
    if measured is None or not math.isfinite(measured):
        return "FAIL"
    paper = Decimal(str(value))
    got = Decimal(repr(float(measured)))  # repr: the shortest text that round-trips the float
    if got.quantize(Decimal(1).scaleb(paper.as_tuple().exponent), rounding=ROUND_HALF_UP) == paper:
        return "OK"
    if got >= paper - Decimal(str(tolerance)):
        return "OKISH"
    return "FAIL"


def run_checks(expected, manifest):
    """One row per `expected` entry (stage, metric, value as text, tolerance, source), plus the
    `measured` value from the manifest (None when the stage did not record it) and `status`."""
    rows = []
    for entry in expected:
        metrics = manifest["stages"].get(entry["stage"], {}).get("metrics") or {}
        measured = metrics.get(entry["metric"])
        rows.append({**entry, "measured": measured, "status": check(measured, entry["value"], entry["tolerance"])})
    return rows


def format_measured(row):
    """The measured value with one decimal more than the paper printed (0.393 -> 0.3931)."""
    if row["measured"] is None:
        return "missing"
    decimals = max(0, -Decimal(row["value"]).as_tuple().exponent) + 1
    return f"{row['measured']:.{decimals}f}"


def format_check(row):
    """One console line, e.g. `OK     eval_hn RR@10 = 0.3931 (0.393, RetroMAE README)`."""
    paper = ", ".join(part for part in (row["value"], row["source"]) if part)
    return f"{row['status']:<6} {row['stage']} {row['metric']} = {format_measured(row)} ({paper})"


def format_number(value):
    """Compact display of a metric: integers as they are, floats to 4 significant digits."""
    return str(value) if isinstance(value, int) else f"{value:.4g}"


# ---- the stages, one by one (notebook 90) ------------------------------------------------

def stage_overview(run_dir, manifest, skip=None):
    """Each stage in run order: {id, notebook, status, wall_s, metrics, error, plots (PNG paths)}.
    `skip`: a stage folder to leave out, e.g. the report's own, whose plots come before the walk."""
    skip = Path(skip).resolve() if skip else None
    stages = []
    for sid, entry in manifest["stages"].items():
        if skip and (Path(run_dir) / sid).resolve() == skip:
            continue
        stages.append({"id": sid, "notebook": entry.get("notebook"), "status": entry.get("status"),
                       "wall_s": entry.get("wall_s"), "metrics": entry.get("metrics") or {},
                       "error": entry.get("error"), "plots": stage_plots(run_dir, sid)})
    return stages


def format_stage(stage):
    """`id (notebook): status in N s`, then its metrics (wrapped) and its error, if any."""
    wall = "" if stage["wall_s"] is None else f" in {stage['wall_s']:.1f} s"
    lines = [f"{stage['id']} ({stage['notebook']}): {stage['status']}{wall}"]
    if stage["metrics"]:
        metrics = "  ".join(f"{name}={format_number(value)}" for name, value in stage["metrics"].items())
        lines.append(textwrap.fill(metrics, width=110, initial_indent="  ", subsequent_indent="  "))
    if stage["error"]:
        lines.append(f"  error: {stage['error']}")
    return "\n".join(lines)


# ---- REPORT.md ----------------------------------------------------------------------------

def write_report(run_dir, manifest, checks):
    """Write <run_dir>/REPORT.md: provenance, the checks, a retrieval-metrics table, the stage table, then
    every stage in run order with its other metrics, its checks and its plots."""
    run_dir = Path(run_dir)
    sections = [
        f"# Reproduction report: {manifest['run']}\n\n{_provenance(manifest)}",
        f"## Reproduction checks\n\n{_checks_table(checks)}",
        f"## Retrieval metrics\n\n{_metrics_table(manifest)}",
        f"## Stages\n\n{_stages_table(manifest)}",
        _stage_sections(run_dir, manifest, checks),
    ]
    path = run_dir / REPORT
    with atomic_write(path) as f:
        f.write("\n\n".join(section for section in sections if section) + "\n")
    return path


def _provenance(manifest):
    wall = sum(entry.get("wall_s") or 0 for entry in manifest["stages"].values())
    lines = [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- pipeline: `{manifest['params_file']}`",
        f"- commit: {_git_commit() or 'unknown (no git commit found)'}",
        f"- hardware: {_hardware()}",
        f"- wall time of all stages: {wall:.1f} s",
    ]
    return "\n".join(lines)


def _git_commit():
    """Short commit of the repository the command runs in, or None without git or a repository."""
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _hardware():
    parts = [platform.platform(), f"Python {platform.python_version()}", f"{os.cpu_count()} CPUs"]
    return ", ".join(parts + _torch_info())


def _torch_info():
    """torch version and GPU names; torch is imported only here because it is slow to import."""
    try:
        import torch
    except ImportError:
        return []
    info = [f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        names = Counter(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        info.append("CUDA: " + ", ".join(f"{count} x {name}" for name, count in names.items()))
    return info


def _stages_table(manifest):
    rows = [(sid, entry["status"], _wall(entry.get("wall_s"))) for sid, entry in manifest["stages"].items()]
    return markdown_table(("stage", "status", "wall time (s)"), rows)


def _wall(seconds):
    return "" if seconds is None else f"{seconds:.1f}"


def is_retrieval_metric(name):
    """RR@10, R@1000, nDCG@10, MRR, ... (also with a prefix such as quantized_): the numbers a table compares."""
    return bool(RETRIEVAL_METRIC.search(name))


def _metrics_table(manifest):
    """Stages as rows, the union of their retrieval metric names as columns (in first-seen order)."""
    stages = {sid: {n: v for n, v in (entry.get("metrics") or {}).items() if is_retrieval_metric(n)}
              for sid, entry in manifest["stages"].items()}
    stages = {sid: metrics for sid, metrics in stages.items() if metrics}
    if not stages:
        return "No retrieval metrics recorded."
    names = list(dict.fromkeys(name for metrics in stages.values() for name in metrics))
    rows = [[sid] + [format_number(m[n]) if n in m else "" for n in names] for sid, m in stages.items()]
    return markdown_table(["stage"] + names, rows)


def _checks_table(checks):
    if not checks:
        return "No `expected` entries in the pipeline."
    rows = [(c["status"], c["stage"], c["metric"], format_measured(c), c["value"], c["tolerance"], c["source"])
            for c in checks]
    return markdown_table(("status", "stage", "metric", "measured", "paper", "tolerance", "source"), rows)


def _stage_sections(run_dir, manifest, checks):
    """One section per stage: status and wall time, its other metrics, its checks, its plots."""
    blocks = []
    for stage in stage_overview(run_dir, manifest):
        wall = "" if stage["wall_s"] is None else f", {stage['wall_s']:.1f} s"
        lines = [f"### {stage['id']}\n\n`{stage['notebook']}`: {stage['status']}{wall}"]
        other = {n: v for n, v in stage["metrics"].items() if not is_retrieval_metric(n)}
        if other:
            lines.append("metrics: " + ", ".join(f"{n} = {format_number(v)}" for n, v in other.items()))
        lines += [f"- {format_check(c)}" for c in checks if c["stage"] == stage["id"]]
        if stage["error"]:
            lines.append(f"error: {stage['error']}")
        lines += [f"![{p.stem}]({quote(p.relative_to(run_dir).as_posix())})" for p in stage["plots"]]
        blocks.append("\n\n".join(lines))
    return "\n\n".join(blocks)


def stage_plots(run_dir, sid):
    """The PNG files anywhere under a stage's folder, sorted by path."""
    return sorted((Path(run_dir) / sid).rglob("*.png"))


def markdown_table(header, rows):
    lines = [_table_row(header), _table_row(["---"] * len(header))]
    return "\n".join(lines + [_table_row(row) for row in rows])


def _table_row(cells):
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"
