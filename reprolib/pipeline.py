"""Run a pipeline of parameterized notebooks with papermill, with resume and reproduction checks.

A pipeline YAML lists stages; each stage is one notebook, executed into
`<out_root>/<run>/<stage id>/` (the executed notebook, params.json, metrics.json, artifacts).
`<run dir>/manifest.json` records each stage's status and params hash, so running the same
YAML again skips finished stages whose inputs did not change. At the end the `expected`
entries are checked against the measured metrics (a paper's number, or a control stage of the
same run) and written to `<run dir>/checks.json` and `<run dir>/REPORT.md`.

Seeds: with `seeds: [1, 2, 3]` (or `--seeds`), every stage marked `seeded: true`, and every stage
that reads one, runs once per seed as `<id>_seed<s>` with its `seed` parameter set to s; the
other stages (data, BM25, the report) run once. A check on a seeded stage uses the mean.
"""
import contextlib
import datetime
import hashlib
import json
import numbers
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import yaml

from reprolib import report
from reprolib.errors import ReprolibError
from reprolib.fileio import atomic_write
from reprolib.kernels import KERNEL_END_PREFIX, KERNEL_LOG, describe_end, start_zygote

MANIFEST = "manifest.json"
INTERRUPTED = "not run: the run was interrupted"   # the manifest's error for stages a Ctrl-C or kill kept from running
LOCK = ".lock"
METRICS = "metrics.json"
PER_QUERY = report.PER_QUERY
PARAMS = "params.json"

TOP_KEYS = ("run", "notebook_dir", "defaults", "seeds", "stages", "expected")
STAGE_KEYS = ("id", "notebook", "params", "seeded")
# A check compares a stage's metric with a paper's `value` (within `tolerance`, either side), or with
# another stage `than` of the same run: better `by` at least this much, with a paired test p < `alpha`,
# or (`within`) no further from it than this, either side (two one-sided tests, p < `alpha`), or
# (`loses_at_most`) worse than it by no more than this (one one-sided test, p < `alpha`: "does not hurt"), or
# with a bound `at_most` (e.g. non-zeros per passage).
EXPECTED_KEYS = ("stage", "metric", "value", "tolerance", "than", "than_metric", "by", "alpha", "within",
                 "loses_at_most", "at_most", "source")

STAGE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")  # no dots: ids appear in ${stages.<id>.out}
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
REFERENCE = re.compile(r"\$\{([^}]*)\}")
STAGE_REFERENCE = re.compile(r"stages\.([^.]+)\.out")
RUN_REFERENCE = "run.out"
PARAMS_DIR_REFERENCE = "params.dir"   # the folder of the pipeline YAML: data paths relative to the checkout
DECIMAL_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class Stage:
    id: str
    notebook: Path   # the source notebook
    kernel: str      # kernelspec name from the notebook's metadata
    code: list       # source of its code cells: only code changes force a rerun
    params: dict     # defaults | stage params | --set, with ${...} references still in place
    upstream: list   # ids of the stages whose outputs it reads
    seeded: bool = False   # runs once per seed (set in the YAML, or because it reads a seeded stage)
    base: str = None       # the YAML's id of a per-seed copy (None: the stage runs once)
    seed: int = None       # the seed of a per-seed copy
    declared: tuple = ()   # the names its notebook's parameters cell assigns


@dataclass
class Pipeline:
    path: Path
    run: str
    stages: list     # in run order, each seeded stage expanded into one copy per seed
    expected: list   # dicts, see _parse_expected; `stage` and `than` are the YAML's ids
    seeds: list      # [] when nothing is repeated


# ---- loading and validating the YAML ------------------------------------------------------

def load_pipeline(path, sets=(), seeds=None):
    """Parse and validate a pipeline YAML, apply `--set stage.key=value` overrides, and expand the
    seeded stages over `seeds` (None: the YAML's `seeds`)."""
    path = Path(path)
    data, value_texts = _read_yaml(path)
    if not isinstance(data, dict):
        raise _error(path, "expected a mapping with 'run' and 'stages'")
    _check_keys(path, data, TOP_KEYS, "top level")
    run = data.get("run", path.stem)
    if not isinstance(run, str) or not RUN_NAME.fullmatch(run):
        raise _error(path, f"'run' must be a name of letters, digits, '_', '-', '.', got {run!r}")
    defaults = _params_mapping(path, data.get("defaults") or {}, "defaults")
    notebook_dir = path.parent / data.get("notebook_dir", "../notebooks")
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise _error(path, "missing 'stages': a list of {id, notebook, params}")
    stages = []
    for index, raw in enumerate(raw_stages):
        stage = _parse_stage(path, index, raw, defaults, notebook_dir)
        if any(s.id == stage.id for s in stages):
            raise _error(path, f"duplicate stage id '{stage.id}'")
        stages.append(stage)
    _apply_sets(path, stages, sets or ())
    _link_references(path, stages)
    expected = _parse_expected(path, data.get("expected"), value_texts, [s.id for s in stages])
    seeds = _parse_seeds(path, data.get("seeds") if seeds is None else seeds)
    if seeds:
        stages = _expand_seeds(path, stages, seeds)
        _link_references(path, stages)
    return Pipeline(path, run, stages, expected, seeds)


def _error(path, problem):
    return ReprolibError(f"{path}: {problem}")


def _read_yaml(path):
    """The YAML data, and each `expected[i].value` as written (its printed precision matters)."""
    if not path.is_file():
        raise _error(path, "pipeline file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _error(path, "not valid UTF-8") from None
    try:
        loader = yaml.SafeLoader(text)   # it rejects unprintable characters as it starts
    except yaml.reader.ReaderError as e:
        line = text[:e.position].count("\n") + 1
        raise _error(path, f"invalid YAML at line {line}: unacceptable character #x{e.character:04x}") from None
    try:
        node = loader.get_single_node()
        _check_duplicate_keys(path, node)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        raise _error(path, f"invalid YAML at line {e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise _error(path, f"invalid YAML: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()
    return data, _expected_value_texts(node)


def _check_duplicate_keys(path, node):
    """YAML lets a repeated key silently replace the first; in a pipeline that is always a mistake."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                if key.value in seen:
                    raise _error(path, f"line {key.start_mark.line + 1}: duplicate key {key.value!r}")
                seen.add(key.value)
            _check_duplicate_keys(path, value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(path, item)


def _expected_value_texts(root):
    """Scalar text of `value` in each `expected` entry, None where it is not a plain number."""
    texts = []
    for key, value in root.value if isinstance(root, yaml.MappingNode) else ():
        if key.value == "expected" and isinstance(value, yaml.SequenceNode):
            for entry in value.value:
                pairs = entry.value if isinstance(entry, yaml.MappingNode) else ()
                fields = {k.value: v for k, v in pairs if isinstance(k, yaml.ScalarNode)}
                text = getattr(fields.get("value"), "value", None)
                texts.append(text if isinstance(text, str) and DECIMAL_TEXT.fullmatch(text) else None)
    return texts


def _check_keys(path, mapping, allowed, where):
    unknown = [key for key in mapping if key not in allowed]
    if unknown:
        raise _error(path, f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")


def _params_mapping(path, params, where):
    """Parameters become Python variables in the notebook, so names must be identifiers."""
    if not isinstance(params, dict):
        raise _error(path, f"{where} must be a mapping of name: value")
    for name in params:
        if not isinstance(name, str) or not name.isidentifier():
            raise _error(path, f"{where}: parameter name {name!r} is not a Python identifier")
    return params


def _parse_stage(path, index, raw, defaults, notebook_dir):
    if not isinstance(raw, dict):
        raise _error(path, f"stages[{index}] must be a mapping with 'id' and 'notebook'")
    _check_keys(path, raw, STAGE_KEYS, f"stages[{index}]")
    sid, name = raw.get("id"), raw.get("notebook")
    if not isinstance(sid, str) or not STAGE_ID.fullmatch(sid):
        raise _error(path, f"stages[{index}]: 'id' must be a name of letters, digits, '_' and '-', got {sid!r}")
    if not isinstance(name, str) or not name:
        raise _error(path, f"stage '{sid}': missing 'notebook'")
    params = _params_mapping(path, raw.get("params") or {}, f"stage '{sid}' params")
    if not isinstance(raw.get("seeded", False), bool):
        raise _error(path, f"stage '{sid}': 'seeded' must be true or false")
    notebook = (notebook_dir / (name if name.endswith(".ipynb") else f"{name}.ipynb")).resolve()
    if not notebook.is_file():
        raise _error(path, f"stage '{sid}': notebook not found: {notebook}")
    try:
        nb = nbformat.read(notebook, as_version=4)
    except Exception as e:  # nbformat raises JSON, validation and OS errors alike
        raise _error(path, f"stage '{sid}': cannot read notebook {notebook}: {e}") from None
    kernel = nb.metadata.get("kernelspec", {}).get("name", "python3")
    code = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    try:
        declared = notebook_parameters(nb)
    except (SyntaxError, ValueError) as e:   # ValueError: a NUL byte, before Python 3.12
        where = f", line {e.lineno}" if getattr(e, "lineno", None) else ""
        raise _error(path, f"stage '{sid}': {notebook}: its parameters cell{where}: {getattr(e, 'msg', e)}") from None
    for name in params:
        _check_declared(path, sid, notebook, declared, name)
    # defaults (e.g. seed) reach the stages whose notebooks have them
    inherited = {name: value for name, value in defaults.items() if name in declared}
    return Stage(sid, notebook, kernel, code, {**inherited, **params}, [], raw.get("seeded", False),
                 declared=tuple(declared))


def notebook_parameters(nb):
    """The names assigned in a notebook's cell tagged `parameters` (papermill injects values for these). Magics
    (`%matplotlib inline`) are read as IPython runs them (a `%%` cell magic makes the whole cell its argument: no
    names); a cell that is not Python raises SyntaxError."""
    import ast

    from IPython.core.inputtransformer2 import TransformerManager

    names = []
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            for node in ast.parse(TransformerManager().transform_cell(cell.source)).body:
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, ast.AnnAssign) else []
                names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def _check_declared(path, sid, notebook, declared, name, source=""):
    """A parameter the notebook does not have would be injected and ignored: a typo must not run."""
    if name in declared:
        return
    import difflib

    close = difflib.get_close_matches(name, declared, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise _error(path, f"{source}stage '{sid}': {notebook.name} has no parameter {name!r}{hint}")


def _apply_sets(path, stages, sets):
    """`--set stage.key=value`: the value is parsed as YAML, so numbers and booleans keep their type."""
    by_id = {stage.id: stage for stage in stages}
    for item in sets:
        target, equals, text = item.partition("=")
        sid, dot, key = target.strip().partition(".")
        if not equals or not dot or not key.isidentifier():
            raise ReprolibError(f"--set {item!r}: expected stage.key=value")
        if sid not in by_id:
            raise ReprolibError(f"--set {item!r}: {path} has no stage '{sid}' (stages: {', '.join(by_id)})")
        stage = by_id[sid]
        _check_declared(path, sid, stage.notebook, stage.declared, key, source=f"--set {item!r}: ")
        try:
            by_id[sid].params[key] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ReprolibError(f"--set {item!r}: the value is not valid YAML") from None


def _references(value):
    """Every `${...}` inside a parameter value, through nested lists and dicts."""
    if isinstance(value, str):
        yield from REFERENCE.findall(value)
    elif isinstance(value, list):
        for item in value:
            yield from _references(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _references(item)


def _link_references(path, stages):
    """Check every ${...} and record each stage's upstream stages; a stage reads only earlier ones. A stage
    given ${run.out} (the report) may read any of them: every earlier stage is upstream of it."""
    position = {stage.id: i for i, stage in enumerate(stages)}
    for i, stage in enumerate(stages):
        upstream = set()
        for ref in _references(stage.params):
            match = STAGE_REFERENCE.fullmatch(ref)
            if ref == RUN_REFERENCE:
                upstream.update(earlier.id for earlier in stages[:i])
                continue
            if ref == PARAMS_DIR_REFERENCE:
                continue
            if not match:
                raise _error(path, f"stage '{stage.id}': unknown reference ${{{ref}}} "
                                   "(use ${stages.<id>.out}, ${run.out} or ${params.dir})")
            target = match.group(1)
            if target not in position:
                raise _error(path, f"stage '{stage.id}' references unknown stage '{target}'")
            if position[target] >= i:
                raise _error(path, f"stage '{stage.id}' references stage '{target}', which does not run before it")
            upstream.add(target)
        stage.upstream = sorted(upstream, key=position.get)


def _parse_seeds(path, seeds):
    if seeds is None or seeds == []:
        return []
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _error(path, f"'seeds' must be a list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise _error(path, f"'seeds' repeats a seed: {seeds}")
    return seeds


def _expand_seeds(path, stages, seeds):
    """Each seeded stage, and each stage reading one, becomes `<id>_seed<s>` for every seed, reading the
    same seed's copies; a stage given ${run.out} (the report) reads them all and runs once."""
    seeded = set()
    for stage in stages:
        if any(ref == RUN_REFERENCE for ref in _references(stage.params)):   # reads every stage, so runs once
            named = [ref for ref in _references(stage.params) if STAGE_REFERENCE.fullmatch(ref)
                     and STAGE_REFERENCE.fullmatch(ref).group(1) in seeded]
            if stage.seeded or named:
                raise _error(path, f"stage '{stage.id}' reads ${{run.out}}, so it runs once for all seeds: it cannot be "
                                   f"seeded nor name a seeded stage ({', '.join(named) or 'seeded: true'})")
        elif stage.seeded or seeded.intersection(stage.upstream):
            seeded.add(stage.id)
    if not seeded:
        raise _error(path, "'seeds' given, but no stage is marked 'seeded: true'")
    expanded = []
    for stage in stages:
        if stage.id not in seeded:
            expanded.append(stage)
            continue
        for seed in seeds:
            def rename(match, seed=seed):
                target = STAGE_REFERENCE.fullmatch(match.group(1))
                if target and target.group(1) in seeded:
                    return "${stages." + seed_copy(target.group(1), seed) + ".out}"
                return match.group(0)
            params = {**_interpolate(stage.params, rename), **({"seed": seed} if "seed" in stage.declared else {})}
            expanded.append(Stage(seed_copy(stage.id, seed), stage.notebook, stage.kernel, stage.code, params, [],
                                  True, stage.id, seed, declared=stage.declared))
    ids = [stage.id for stage in expanded]
    clash = next((sid for sid in ids if ids.count(sid) > 1), None)
    if clash:
        raise _error(path, f"stage id '{clash}' clashes with a per-seed copy of a seeded stage")
    return expanded


def seed_copy(sid, seed):
    """The id of stage `sid`'s copy for `seed`."""
    return f"{sid}_seed{seed}"


def _parse_expected(path, raw, value_texts, stage_ids):
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _error(path, "'expected' must be a list of {stage, metric, value, tolerance, source}, "
                           "{stage, metric, than, by | within | loses_at_most, source} or {stage, metric, at_most, source}")
    expected = []
    for i, entry in enumerate(raw):
        where = f"expected[{i}]"
        if not isinstance(entry, dict):
            raise _error(path, f"{where} must be a mapping with stage, metric, and value or than")
        _check_keys(path, entry, EXPECTED_KEYS, where)
        for key in ("stage", "than"):
            if key in entry and entry[key] not in stage_ids:
                raise _error(path, f"{where}: unknown {key} {entry[key]!r}")
        if "stage" not in entry:
            raise _error(path, f"{where}: missing 'stage'")
        for key in ("metric", "than_metric"):
            if (key == "metric" or key in entry) and (not isinstance(entry.get(key), str) or not entry[key]):
                raise _error(path, f"{where}: missing '{key}'")
        if sum(key in entry for key in ("value", "than", "at_most")) != 1:
            raise _error(path, f"{where}: give one of 'value' (a paper's number), 'than' (a control stage) or "
                               "'at_most' (a bound, e.g. on non-zeros per passage)")
        check = {"stage": entry["stage"], "metric": entry["metric"], "source": str(entry.get("source", ""))}
        if "at_most" in entry:
            _no_keys(path, entry, where, ("tolerance", "than_metric", "by", "alpha", "within", "loses_at_most"),
                     "a bound (at_most)")
            if not _is_number(entry["at_most"]):
                raise _error(path, f"{where}: 'at_most' must be a number, got {entry['at_most']!r}")
            check["at_most"] = entry["at_most"]
        elif "value" in entry:
            _no_keys(path, entry, where, ("than_metric", "by", "alpha", "within", "loses_at_most"), "a paper check")
            value, tolerance = entry["value"], entry.get("tolerance", 0)
            if not _is_number(value):
                raise _error(path, f"{where}: 'value' must be a number, got {value!r}")
            if not _is_number(tolerance) or tolerance < 0:
                raise _error(path, f"{where}: 'tolerance' must be a number >= 0, got {tolerance!r}")
            check.update(value=value_texts[i] if i < len(value_texts) and value_texts[i] else str(value),
                         tolerance=tolerance)
        else:
            _no_keys(path, entry, where, ("tolerance",), "a relative check")
            by, alpha = entry.get("by", 0.0), entry.get("alpha", 0.05)
            if entry["than"] == entry["stage"] and entry.get("than_metric", entry["metric"]) == entry["metric"]:
                raise _error(path, f"{where}: compares {entry['stage']} {entry['metric']} with itself")
            if not _is_number(by) or by < 0:
                raise _error(path, f"{where}: 'by' must be a number >= 0 (the margin the method must win by), got {by!r}")
            if not _is_number(alpha) or not 0 < alpha < 1:
                raise _error(path, f"{where}: 'alpha' must be a number between 0 and 1, got {alpha!r}")
            check.update(than=entry["than"], than_metric=entry.get("than_metric", entry["metric"]), by=by, alpha=alpha)
            for margin, kind in (("within", "an equivalence check"), ("loses_at_most", "a non-inferiority check")):
                if margin in entry:   # the same quality as the reference / no worse than it, not better
                    _no_keys(path, entry, where, ("by", *{"within", "loses_at_most"} - {margin}), f"{kind} ({margin})")
                    if not _is_number(entry[margin]) or entry[margin] < 0:
                        raise _error(path, f"{where}: '{margin}' must be a number >= 0, got {entry[margin]!r}")
                    check[margin] = entry[margin]
        expected.append(check)
    return expected


def _no_keys(path, entry, where, keys, kind):
    extra = [key for key in keys if key in entry]
    if extra:
        raise _error(path, f"{where}: '{extra[0]}' does not belong in {kind}")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---- parameters and hashes ----------------------------------------------------------------

def _resolve_params(pipeline, run_dir):
    """Each stage's notebook parameters: ${...} replaced by absolute paths, plus its `out_dir`."""
    outs = {stage.id: str(run_dir / stage.id) for stage in pipeline.stages}

    def substitute(match):
        ref = match.group(1)
        if ref == RUN_REFERENCE:
            return str(run_dir)
        if ref == PARAMS_DIR_REFERENCE:
            return str(pipeline.path.resolve().parent)
        return outs[STAGE_REFERENCE.fullmatch(ref).group(1)]

    return {stage.id: {**_interpolate(stage.params, substitute), "out_dir": outs[stage.id]}
            for stage in pipeline.stages}


def _interpolate(value, substitute):
    return _map_strings(value, lambda text: REFERENCE.sub(substitute, text))


def _map_strings(value, change):
    """`value` with `change` applied to every string in it, through lists and dicts."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, list):
        return [_map_strings(item, change) for item in value]
    if isinstance(value, dict):
        return {key: _map_strings(item, change) for key, item in value.items()}
    return value


def _run_relative(value, run_dir):
    """`value` with every path inside `run_dir` written from ${run.out}: what a stage reads from its own run does not
    depend on where the run folder lies. A path that leaves the folder (through "..") stays what it names."""
    root = str(run_dir)

    def relative(text):
        path = os.path.normpath(text)
        inside = path == root or path.startswith(root + os.sep)
        return "${" + RUN_REFERENCE + "}" + path[len(root):] if inside else text

    return _map_strings(value, relative)


def _stage_hashes(pipeline, params, run_dir=None):
    """sha256 of each stage's resolved params, code cells and upstream hashes (so a changed
    upstream stage reruns everything downstream of it). Paths inside `run_dir` are hashed relative to it, so that a
    run folder moved or copied elsewhere is still done; without it they are hashed as they are, as runs recorded them
    until 2026-12-06 (`_adopt_run_relative_hashes`)."""
    hashes = {}
    for stage in pipeline.stages:  # in order: upstream hashes are known before they are needed
        stage_params = params[stage.id] if run_dir is None else _run_relative(params[stage.id], run_dir)
        blob = {"params": stage_params, "code": stage.code, "upstream": {u: hashes[u] for u in stage.upstream}}
        hashes[stage.id] = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()
    return hashes


def _adopt_run_relative_hashes(pipeline, manifest, params, hashes):
    """A stage recorded until 2026-12-06 with the hash of its absolute paths, in a folder that has not moved since,
    takes the run-relative hash, so it stays done; so does each such upstream hash it recorded, so that a rerun for
    another reason does not blame an upstream stage. (A folder moved before it was run once where it lay reruns.)"""
    absolute = _stage_hashes(pipeline, params)
    for stage in pipeline.stages:
        entry = manifest["stages"][stage.id]
        if entry.get("params_hash") == absolute[stage.id]:
            entry["params_hash"] = hashes[stage.id]
        if isinstance(entry.get("upstream_hashes"), dict):
            entry["upstream_hashes"] = {u: hashes[u] if u in absolute and h == absolute[u] else h
                                        for u, h in entry["upstream_hashes"].items()}


def _prepare(pipeline, run_dir):
    """Each stage's resolved params, its hash and the manifest to run with (see `_start_manifest`)."""
    params = _resolve_params(pipeline, run_dir)
    hashes = _stage_hashes(pipeline, params, run_dir)
    manifest = _start_manifest(pipeline, run_dir)
    _adopt_run_relative_hashes(pipeline, manifest, params, hashes)
    return params, hashes, manifest


# ---- running ------------------------------------------------------------------------------

def run_pipeline(params_path, out_root="outputs", sets=(), from_stage=None, only=None, force=False, seeds=None,
                 jobs=1, log=print):
    """Run the pipeline in `params_path` into `<out_root>/<run>/`, resuming where possible.

    `force` reruns every stage; `from_stage` reruns that stage and all later ones; `only` runs
    just that stage; `seeds` replaces the YAML's list of seeds; `jobs` > 1 runs up to that many
    stages at once (see `_execute_concurrently`). Returns the manifest. Raises ReprolibError naming
    the stage and cell when a notebook fails.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ReprolibError(f"--jobs {jobs}: the number of stages run at once must be a whole number, at least 1")
    pipeline = load_pipeline(params_path, sets, seeds)
    run_dir = (Path(out_root) / pipeline.run).resolve()
    with _run_lock(run_dir):
        return _run_locked(pipeline, run_dir, from_stage, only, force, log, jobs)


@contextlib.contextmanager
def _run_lock(run_dir):
    """Hold <run_dir>/.lock for the run: a second `reprolib run` on the same folder would delete the first's
    stage folders under it. The system drops the lock when the process ends, however it ends."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise ReprolibError(f"{run_dir} is in use by another `reprolib run` (pid {holder}); "
                                "wait for it to end, or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield


def plan_pipeline(params_path, out_root="outputs", sets=(), from_stage=None, only=None, force=False, seeds=None):
    """What `run_pipeline` with the same arguments would do, without doing anything: a list of
    (stage id, action, why), action 'skip', 'resume', 'run' (never run) or 'rerun' (clear the stage folder and
    run anew)."""
    pipeline = load_pipeline(params_path, sets, seeds)
    run_dir = (Path(out_root) / pipeline.run).resolve()
    params, hashes, manifest = _prepare(pipeline, run_dir)
    forced = _forced_stages(pipeline, from_stage, only, force)
    if only:
        _check_upstream_done(pipeline, manifest, only)   # as the run would refuse
    never_run = {sid for sid, entry in manifest["stages"].items() if entry.get("params_hash") is None}
    return [(stage.id, action if action != "fresh" else "run" if stage.id in never_run else "rerun", why)
            for stage, action, why in _plan(pipeline, manifest, params, hashes, forced, only, run_dir)]


def _plan(pipeline, manifest, params, hashes, forced, only, run_dir):
    """(stage, action, why) for each stage due: see `_action`; `why` says what made it so."""
    plan = []
    for stage in pipeline.stages:
        if only and stage.id != only:
            continue
        entry = manifest["stages"][stage.id]
        action = _action(entry, hashes[stage.id], stage.id in forced)
        plan.append((stage, action, _why(stage, entry, action, stage.id in forced, hashes, params, run_dir)))
    return plan


def _why(stage, entry, action, forced, hashes, params, run_dir):
    if action == "skip":
        return "done, parameters and notebook unchanged"
    if action == "resume":
        return f"was {entry['status']} with the same inputs: resumes in its folder"
    if forced:
        why = "asked for (--from, --only or --force)"
    elif entry.get("params_hash") in (None, hashes[stage.id]):
        why = "not run yet" if entry.get("params_hash") is None else f"was {entry['status']}"
    else:
        why = "; ".join(_what_changed(stage, entry, hashes, params, run_dir))
    if entry.get("status") == "done":
        why += f"; clears a finished stage ({entry.get('wall_s')} s)"
    return why


def _what_changed(stage, entry, hashes, params, run_dir):
    """Which of a stage's inputs (its parameters, its notebook's code, an upstream stage) differ from the run
    that made its folder. Manifests before the parts were recorded know the parameters only."""
    old = _read_json(run_dir / stage.id / PARAMS, None)
    if old and isinstance(old.get("out_dir"), str):   # a moved run folder: its paths are not a change
        old = _run_relative(old, Path(old["out_dir"]).parent)
    new = _run_relative(json.loads(json.dumps(params[stage.id], default=str)), run_dir)
    keys = sorted(k for k in set(old or {}) | set(new) if (old or {}).get(k) != new.get(k)) if old else []
    reasons = [f"parameters changed: {', '.join(keys)}"] if keys else []
    if "code_hash" not in entry:
        return reasons or ["its notebook's code or an upstream stage changed" if old else
                           "parameters, notebook or an upstream stage changed"]
    if entry["code_hash"] != _code_hash(stage):
        reasons.append(f"its notebook's code changed ({stage.notebook.name})")
    moved = [u for u in stage.upstream if entry.get("upstream_hashes", {}).get(u) != hashes[u]]
    if moved:
        reasons.append(f"upstream stage {moved[0]} changed")
    return reasons or ["its inputs changed"]


def _code_hash(stage):
    return hashlib.sha256(json.dumps(stage.code).encode()).hexdigest()


def _run_locked(pipeline, run_dir, from_stage, only, force, log, jobs=1):
    params, hashes, manifest = _prepare(pipeline, run_dir)
    forced = _forced_stages(pipeline, from_stage, only, force)
    if only:
        _check_upstream_done(pipeline, manifest, only)
    plan = []
    for stage, action, why in _plan(pipeline, manifest, params, hashes, forced, only, run_dir):
        if action == "fresh" and manifest["stages"][stage.id]["status"] == "done":
            log(f"rerun {stage.id}: {why}")   # finished work is about to be cleared: say why
        plan.append((stage, action))
    _write_manifest(run_dir, manifest)
    try:
        _execute_plan(plan, params, hashes, manifest, run_dir, log, jobs)
    finally:  # checks and report are rewritten even after a failure, so they never show stale results
        checks = report.run_checks(pipeline.expected, manifest, run_dir)
        report.write_checks(run_dir, checks)
        report_path = report.write_report(run_dir, manifest, checks)
    for row in checks:
        log(report.format_check(row))
    log(f"report: {report_path}")
    return manifest


def _forced_stages(pipeline, from_stage, only, force):
    ids = [stage.id for stage in pipeline.stages]
    copies = [stage.id for stage in pipeline.stages if from_stage and stage.base == from_stage]
    from_stage = copies[0] if copies else from_stage   # --from a seeded stage: from its first copy
    if from_stage and only:
        raise ReprolibError("use either --from or --only, not both")
    if only and any(stage.base == only for stage in pipeline.stages):
        raise ReprolibError(f"--only {only}: it runs once per seed; name one copy, e.g. --only {seed_copy(only, pipeline.seeds[0])}")
    for option, sid in (("--from", from_stage), ("--only", only)):
        if sid and sid not in ids:
            raise ReprolibError(f"{option} {sid}: {pipeline.path} has no such stage (stages: {', '.join(ids)})")
    if only:
        return {only}
    if from_stage:
        return set(ids[ids.index(from_stage):])
    return set(ids) if force else set()


def _start_manifest(pipeline, run_dir):
    """The previous manifest's entries for the current stages (in YAML order), new ones for the rest. Finished
    stages that the current list lacks (a plain run's, during a --seeds run of the same YAML) are parked, not
    dropped: their folders stay, and the next run of that list skips them again."""
    previous = load_manifest(run_dir) if (run_dir / MANIFEST).exists() else {}
    parked = previous.get("parked") if isinstance(previous.get("parked"), dict) else {}
    old = {**parked, **previous.get("stages", {})}
    stages = {}
    for stage in pipeline.stages:
        entry = old.get(stage.id) or {"notebook": None, "status": "pending", "params_hash": None, "started": None,
                                      "finished": None, "wall_s": None, "metrics": {}, "error": None}
        entry.update(notebook=stage.notebook.name, base=stage.base, seed=stage.seed)
        stages[stage.id] = entry
    parked = {sid: entry for sid, entry in old.items()
              if sid not in stages and isinstance(entry, dict) and entry.get("status") == "done"}
    return {"run": pipeline.run, "params_file": str(pipeline.path.resolve()), "seeds": pipeline.seeds, "stages": stages,
            "parked": parked}


def _check_upstream_done(pipeline, manifest, only):
    stage = next(s for s in pipeline.stages if s.id == only)
    missing = [u for u in stage.upstream if manifest["stages"][u]["status"] != "done"]
    if missing:
        raise ReprolibError(f"--only {only}: it reads the output of {', '.join(missing)}, "
                            "which has not run successfully yet; run the pipeline without --only first")


def _action(entry, digest, forced):
    """'skip', 'resume' (rerun in the existing stage dir) or 'fresh' (clear the stage dir, then run)."""
    if forced or entry.get("params_hash") != digest:
        return "fresh"
    if entry["status"] == "done":
        return "skip"
    # killed or failed with the same inputs: keep the dir, the notebook may resume from checkpoints
    return "resume" if entry["status"] in ("running", "failed") else "fresh"


def _execute_plan(plan, params, hashes, manifest, run_dir, log, jobs=1):
    zygote = start_zygote() if any(action != "skip" for _, action in plan) else None  # see reprolib.kernels
    try:
        if jobs > 1:
            _execute_concurrently(plan, params, hashes, manifest, run_dir, log, zygote, jobs)
            return
        for position, (stage, action) in enumerate(plan):
            if action == "skip":
                log(f"skip {stage.id} (done, params unchanged)")
                continue
            try:
                _run_stage(stage, params[stage.id], hashes, action == "fresh", manifest, run_dir, log,
                           zygote)
            except BaseException as e:
                why = INTERRUPTED if isinstance(e, KeyboardInterrupt) else None
                _mark_not_run(manifest, plan[position + 1:], stage.id, why)
                _write_manifest(run_dir, manifest)
                raise
    finally:
        if zygote:
            zygote.close()


def _execute_concurrently(plan, params, hashes, manifest, run_dir, log, zygote, jobs):
    """Run up to `jobs` stages at once, each as soon as the stages it reads have finished (YAML order among
    the ready ones). The cores are shared out: a stage takes one of the `jobs` slots, or N of them if it trains
    with `num_processes` N (one such stage at a time: they would share a port), and its processes get
    cores x slots / (jobs x N) threads each. On a small CPU model two stages on one thread each do more per second
    than one on two (bench/README.md, "Stages at once"). A stage that no other stage of the run can overlap (each
    one reads it or is read by it, directly or through others) takes every slot: the data stage, or a pretraining
    that nothing else could run beside. The stages due in this run decide it, not timing: the same command on the
    same run folder gets the same threads. (A resume, --from or --only runs fewer stages, and one of them may then
    run alone where the full run shared its cores: the manifest's `threads` says.) After a failure no new stage
    starts; the running ones finish, then the error is raised. Ctrl-C (or kill) interrupts the running kernels
    (they run in sessions of their own).

    Stages run in threads of this process: nothing here may chdir or set os.environ (papermill resolves its own
    paths against the process's working directory, and every path it is given is absolute)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    waiting = []
    for stage, action in plan:
        if action == "skip":
            log(f"skip {stage.id} (done, params unchanged)")
        else:
            waiting.append((stage, action))
    finished = {sid for sid, entry in manifest["stages"].items() if entry["status"] == "done"}
    finished -= {stage.id for stage, _ in waiting}
    running = {}   # future -> (stage, slots, kernels: the kernel managers its notebook started)
    alone = _alone([stage for stage, _ in waiting])
    failure = None
    abort = threading.Event()   # after Ctrl-C (or kill) a kernel about to start does not
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        while waiting or running:
            free = jobs - sum(slots for _, slots, _ in running.values())
            several = any(slots > 1 for _, slots, _ in running.values())
            for item in list(waiting if failure is None else ()):
                stage, action = item
                processes = _processes(params[stage.id])
                slots = min(jobs, processes)
                if any(u not in finished for u in stage.upstream) or slots > free or (slots > 1 and several):
                    continue
                waiting.remove(item)
                if stage.id in alone:
                    slots = jobs
                threads = max(1, _cores() * slots // (jobs * processes))
                executed, stage_dir = _begin_stage(stage, params[stage.id], hashes, action == "fresh", manifest,
                                                   run_dir, log, threads)
                kernels = []
                future = pool.submit(_timed_execute, stage, executed, params[stage.id], stage_dir, zygote,
                                     {"OMP_NUM_THREADS": str(threads)}, kernels, abort)
                running[future] = (stage, slots, kernels)
                free -= slots
                several = several or slots > 1
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                stage, _, _ = running.pop(future)
                try:
                    _finish_stage(stage, *future.result(), manifest, run_dir, log)
                    finished.add(stage.id)
                except Exception as e:   # the stage failed
                    failure = failure or (stage.id, e)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            abort.set()
            _interrupt(running)
        wait(running)   # anything else (a bug, a full disk): the running stages finish first
        for future, (stage, _, _) in running.items():
            with contextlib.suppress(BaseException):   # a stage that finished in time is recorded as done
                _finish_stage(stage, *future.result(), manifest, run_dir, log)
        _mark_not_run(manifest, waiting, why=INTERRUPTED if isinstance(e, KeyboardInterrupt)
                      else f"not run: the run stopped on {type(e).__name__}")
        _write_manifest(run_dir, manifest)
        raise
    finally:
        pool.shutdown()
    if failure is not None:
        failed_id, error = failure
        _mark_not_run(manifest, waiting, failed_id)
        _write_manifest(run_dir, manifest)
        raise error
    if waiting:   # every stage's upstream is finished or waiting: cannot happen
        raise ReprolibError(f"stages {', '.join(stage.id for stage, _ in waiting)} never became ready")


def _alone(stages):
    """The ids of the `stages` (YAML order) that none of the others can run beside: each other one reads it or
    is read by it, directly or through other stages."""
    ancestors = {}
    for stage in stages:   # stages outside the list are not run now: they order nothing
        ancestors[stage.id] = set(stage.upstream).union(*(ancestors[u] for u in stage.upstream if u in ancestors))
    return {stage.id for stage in stages if all(other is stage or other.id in ancestors[stage.id]
                                                or stage.id in ancestors[other.id] for other in stages)}


def _cores():
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def _processes(params):
    """How many processes a stage trains with (its `num_processes` parameter, 1 without one)."""
    value = params.get("num_processes", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1


def _interrupt(running, grace_s=30):
    """Signal the running stages' kernels until every stage's thread has returned: SIGINT (a KeyboardInterrupt
    in the running cell), then SIGTERM after `grace_s` or at a second Ctrl-C (or `kill`, which `reprolib run`
    turns into one). A kernel still starting is signalled once it has a process."""
    import signal
    from concurrent.futures import wait

    deadline = time.monotonic() + grace_s
    sent = set()
    while True:
        try:
            _, pending = wait(running, timeout=0.5)
            if not pending:
                return
            signum = signal.SIGINT if time.monotonic() < deadline else signal.SIGTERM
            for future in pending:
                for km in running[future][2]:
                    process = getattr(getattr(km, "provisioner", None), "process", None)
                    if process is not None and process.poll() is None and (process.pid, signum) not in sent:
                        process.send_signal(signum)
                        sent.add((process.pid, signum))
        except KeyboardInterrupt:   # a second Ctrl-C or kill: stop waiting for the cells to notice
            deadline = 0


def _mark_not_run(manifest, rest, failed_id=None, why=None):
    """Later stages that were due to run become 'skipped'; killed or failed ones keep their
    status, so a later run still resumes them in place."""
    for stage, action in rest:
        entry = manifest["stages"][stage.id]
        if action != "skip" and entry["status"] not in ("running", "failed"):
            entry.update(status="skipped", error=why or f"not run: stage '{failed_id}' failed")


def _run_stage(stage, params, hashes, clear, manifest, run_dir, log, zygote=None):
    executed, stage_dir = _begin_stage(stage, params, hashes, clear, manifest, run_dir, log)
    wall_s, error = _timed_execute(stage, executed, params, stage_dir, zygote)
    _finish_stage(stage, wall_s, error, manifest, run_dir, log)


def _begin_stage(stage, params, hashes, clear, manifest, run_dir, log, threads=None):
    """Prepare the stage's folder and mark it running; returns (executed notebook path, stage folder). `threads`:
    what each of its processes was given (None: the default, all cores), recorded since results depend on it."""
    digest, upstream = hashes[stage.id], {u: hashes[u] for u in stage.upstream}
    stage_dir = run_dir / stage.id
    if clear and stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(stage_dir / PARAMS) as f:
        json.dump(params, f, indent=2, default=str)
    entry = manifest["stages"][stage.id]
    entry.update(status="running", params_hash=digest, code_hash=_code_hash(stage), upstream_hashes=upstream,
                 started=_now(), finished=None, wall_s=None, metrics={}, error=None, threads=threads)
    _write_manifest(run_dir, manifest)
    log(f"▶ stage {stage.id} ({stage.notebook.name})")
    return stage_dir / stage.notebook.name, stage_dir


def _timed_execute(stage, executed, params, stage_dir, zygote=None, env=None, kernels=None, abort=None):
    """(wall seconds, the error or None): also KeyboardInterrupt, since the manifest must say the stage did
    not finish."""
    start = time.perf_counter()
    try:
        _execute(stage, executed, params, stage_dir, zygote, env, kernels, abort)
        error = None
    except BaseException as e:
        error = e
    return round(time.perf_counter() - start, 1), error


def _finish_stage(stage, wall_s, error, manifest, run_dir, log):
    stage_dir = run_dir / stage.id
    entry = manifest["stages"][stage.id]
    entry.update(status="failed" if error else "done", finished=_now(), wall_s=wall_s,
                 metrics=_read_json(stage_dir / METRICS, {}), error=_describe(error) if error else None)
    _write_manifest(run_dir, manifest)
    if error:
        raise _stage_error(stage.id, error, stage_dir / stage.notebook.name)
    metrics = " ".join(f"{name}={report.format_number(value)}" for name, value in entry["metrics"].items())
    log(f"✓ {stage.id} {entry['wall_s']}s {metrics}".rstrip())


def _execute(stage, executed, params, stage_dir, zygote=None, env=None, kernels=None, abort=None):
    """Run the stage's notebook in a new kernel: a fork of `zygote` where there is one. The kernel's
    environment is ours plus reprolib.progress's STAGE_ENVIRONMENT plus `env`; every kernel manager the
    run starts is appended to `kernels` (to interrupt it from another thread), and none starts once the
    threading.Event `abort` is set."""
    import papermill  # here, not at the top: notebooks import this module for save_metrics only

    from reprolib.progress import STAGE_ENVIRONMENT

    processes = []   # the processes this stage's kernel managers started, newest last
    manager = _stage_kernel_manager(zygote, stage_dir, {**STAGE_ENVIRONMENT, **(env or {})},
                                    kernels if kernels is not None else [], processes, abort)
    kernel_log = Path(stage_dir) / KERNEL_LOG
    for attempt in range(1, KERNEL_START_TRIES + 1):
        log_start = kernel_log.stat().st_size if kernel_log.exists() else 0   # a rerun appends to the last one's
        started = len(processes)
        try:
            # progress_bar: a live cell counter on a terminal; in a log file one line per stage (its bar would
            # be a line per update)
            papermill.execute_notebook(str(stage.notebook), str(executed), parameters=params,
                                       kernel_name=stage.kernel, progress_bar=sys.stderr.isatty(),
                                       kernel_manager_class=manager)
            return
        except RuntimeError as e:  # also nbclient's DeadKernelError
            # after its start timeout jupyter_client stops the kernel itself: how that ended is no cause
            e.kernel_end = None if _start_timed_out(e) else _kernel_end(kernel_log, log_start)
            if e.kernel_end is None and _died_by_itself(e):
                e.kernel_end = _process_end(processes[started:])
            # No cell has run, so starting again is safe. The usual cause is a race on the kernel's TCP ports:
            # jupyter_client picks free ones and closes them, and before the new kernel binds them another
            # connection (a stage beside it, any process on the machine) may take one.
            if not _died_at_start(e) or (abort is not None and abort.is_set()):
                raise
            if attempt == KERNEL_START_TRIES:
                last = RuntimeError(f"{e} ({KERNEL_START_TRIES} tries)")
                last.kernel_end = e.kernel_end
                raise last from e


KERNEL_START_TRIES = 3


def _kernel_end(kernel_log, start):
    """How this attempt's kernel died, where its proxy could tell (reprolib.kernels writes it to kernel.log):
    "(pid N) was killed by SIGKILL", ...; None otherwise."""
    try:
        with open(kernel_log, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    # the kernel may have died mid-line, leaving the proxy's line glued to its last output
    ends = [line.rsplit(KERNEL_END_PREFIX, 1)[1] for line in text.splitlines() if KERNEL_END_PREFIX in line]
    return ends[-1] if ends else None


def _process_end(processes):
    """How the last of `processes` (subprocess.Popen) ended, if it did not end well; None otherwise. This is
    the kernel's own process, unless its kernelspec went through reprolib.kernels' proxy (which exits 0 once
    it has written how the forked kernel ended to kernel.log)."""
    code = processes[-1].poll() if processes else None
    return describe_end(processes[-1].pid, code) if code else None


def _died_by_itself(error):
    """The kernel was dead when nbclient noticed: jupyter_client stopped nothing (after a start timeout it
    stops a live kernel with SIGINT, SIGTERM, then SIGKILL, which must not read as the cause)."""
    from nbclient.exceptions import DeadKernelError

    return isinstance(error, DeadKernelError) or _died_at_start(error)


def _died_at_start(error):
    """jupyter_client's error for a kernel that exited before it answered its first request."""
    return isinstance(error, RuntimeError) and "before replying to kernel_info" in str(error)


def _start_timed_out(error):
    """jupyter_client's error for a kernel that did not answer in time as it started (it then stops the kernel)."""
    return isinstance(error, RuntimeError) and str(error).startswith("Kernel didn't respond")


def _stage_kernel_manager(zygote, stage_dir, env, kernels, processes, abort=None):
    """The kernel manager class of one stage: the zygote's (forked kernels) or jupyter_client's. It starts its
    kernel in `stage_dir` with `env` added to this process's environment, and neither is set in this process
    (papermill's own `cwd` would chdir it): stages may run in parallel threads. Each manager is appended to
    `kernels` and the process it launched to `processes` (kept past jupyter_client's cleanup, for its exit code)."""
    if zygote:
        base = zygote.kernel_manager_class
    else:
        from jupyter_client import AsyncKernelManager as base

    class StageKernelManager(base):
        async def start_kernel(self, **kw):
            if abort is not None and abort.is_set():
                raise KeyboardInterrupt
            kw.update(cwd=str(stage_dir), env={**kw.get("env", os.environ), **env})
            kernels.append(self)
            await super().start_kernel(**kw)
            process = getattr(self.provisioner, "process", None)   # a LocalProvisioner's subprocess.Popen
            if process is not None:
                processes.append(process)

    return StageKernelManager


def _describe(error):
    """One line for the manifest: the failing cell and exception."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(error, PapermillExecutionError):
        cell = error.exec_count if error.exec_count is not None else error.cell_index
        evalue = " ".join(str(error.evalue).split())
        return f"cell {cell}: {error.ename}: {evalue}" if evalue else f"cell {cell}: {error.ename}"
    message = " ".join(str(error).split())
    described = f"{type(error).__name__}: {message}" if message else type(error).__name__
    end = getattr(error, "kernel_end", None)
    if end:
        described += f"; the kernel {end}"
        if end.endswith("killed by SIGKILL"):   # reprolib.kernels.describe_end's wording
            described += (" (on Linux usually the out-of-memory killer: run fewer stages at once with --jobs, or give"
                          " the stage a smaller batch_size)")
    return described


def _stage_error(sid, error, executed):
    """A one-line ReprolibError for errors in the notebook or its kernel; anything else is a bug
    (or an interrupt) and propagates unchanged."""
    from jupyter_client.kernelspec import NoSuchKernel
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    if isinstance(error, PapermillExecutionError):
        return ReprolibError(f"stage '{sid}' failed in {_describe(error)} (see {executed})")
    if isinstance(error, (NoSuchKernel, DeadKernelError)) or _died_at_start(error) or _start_timed_out(error):
        log = Path(executed).parent / KERNEL_LOG
        see = f"{executed} and {log}" if log.exists() and log.stat().st_size else str(executed)
        return ReprolibError(f"stage '{sid}' failed: {_describe(error)} (see {see})")
    return error


def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ---- manifest and metrics files -----------------------------------------------------------

def _read_json(path, default):
    path = Path(path)
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReprolibError(f"{path}: not valid JSON ({e})") from None


def _write_manifest(run_dir, manifest):
    with atomic_write(Path(run_dir) / MANIFEST) as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)


def load_manifest(run_dir):
    """The manifest of a run directory (ReprolibError if there is none)."""
    path = Path(run_dir) / MANIFEST
    manifest = _read_json(path, None)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
        raise ReprolibError(f"{run_dir}: no {MANIFEST} here; is this a run directory (outputs/<run>)?")
    for sid, entry in manifest["stages"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("status"), str):
            raise ReprolibError(f"{path}: stage '{sid}' is not a stage record (status, params_hash, ...); the file "
                                "was edited or damaged: delete the run folder, or that stage's entry to rerun it")
    return manifest


def format_status(run_dir, max_metrics=4):
    """A table of the run's stages: status, wall time and the first few metrics, then any errors."""
    manifest = load_manifest(run_dir)
    rows = [("stage", "status", "wall", "metrics")]
    for sid, entry in manifest["stages"].items():
        metrics = list(entry.get("metrics", {}).items())
        shown = " ".join(f"{name}={report.format_number(value)}" for name, value in metrics[:max_metrics])
        wall = "" if entry.get("wall_s") is None else f"{entry['wall_s']:.1f}s"
        rows.append((sid, entry["status"], wall, shown + (" ..." if len(metrics) > max_metrics else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"run {manifest['run']} ({manifest.get('params_file', '?')})"]
    lines += [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip() for r in rows]
    lines += [f"{sid}: {entry['error']}" for sid, entry in manifest["stages"].items() if entry.get("error")]
    return "\n".join(lines)


def save_per_query(out_dir, per_query, prefix=""):
    """Merge per-query values ({metric: {qid: value}}, e.g. `metrics.evaluate(...).per_query`) into
    <out_dir>/per_query.json, each metric renamed `prefix + metric`: the paired tests of relative checks
    read them."""
    path = Path(out_dir) / PER_QUERY
    merged = {**_read_json(path, {}),
              **{prefix + name: {str(q): float(v) for q, v in values.items()} for name, values in per_query.items()}}
    with atomic_write(path) as f:
        json.dump(merged, f)


def save_metrics(out_dir, metrics):
    """Merge `metrics` (name -> number) into <out_dir>/metrics.json; called by notebooks, read by
    the manifest, the status table and the reproduction checks."""
    clean = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numbers.Real covers numpy scalars
            raise ReprolibError(f"metric {name!r} must be a number, got {type(value).__name__} {value!r}")
        clean[str(name)] = int(value) if isinstance(value, numbers.Integral) else float(value)
    path = Path(out_dir) / METRICS
    merged = {**_read_json(path, {}), **clean}
    with atomic_write(path) as f:
        json.dump(merged, f, indent=2)
