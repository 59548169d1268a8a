"""Shipped notebooks and pipelines: `reprolib run NAME`, `reprolib notebooks DEST`, and a wheel that carries them."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from reprolib import bundle
from reprolib.cli import main
from reprolib.errors import ReprolibError

ROOT = Path(__file__).resolve().parents[1]


def checkout_files():
    return {f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb")} | \
           {p.relative_to(ROOT).as_posix() for p in (ROOT / "params").rglob("*.yaml")}


def test_a_checkout_ships_its_own_notebooks_and_params():
    assert bundle.root() == ROOT
    shipped = {f"{folder}/{f.as_posix()}" for folder in bundle.FOLDERS for f in bundle.files(folder)}
    assert shipped == checkout_files()


def test_a_course_kept_under_a_folder_named_outputs_still_ships(tmp_path, monkeypatch):
    """Only an outputs/ or .ipynb_checkpoints/ inside notebooks/ or params/ is left out, not one above them."""
    course = tmp_path / "outputs" / "course"
    for folder, name in (("notebooks", "00_intro.ipynb"), ("params", "quickstart.yaml"),
                         ("notebooks", ".ipynb_checkpoints/00_intro-checkpoint.ipynb")):
        (course / folder / name).parent.mkdir(parents=True, exist_ok=True)
        (course / folder / name).write_text("{}")
    monkeypatch.setattr(bundle, "root", lambda: course)
    assert bundle.files("notebooks") == [Path("00_intro.ipynb")] and bundle.pipelines() == ["quickstart"]


def test_a_pipeline_name_resolves_to_the_shipped_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # nothing called quickstart here
    assert bundle.pipeline_path("quickstart") == ROOT / "params" / "quickstart.yaml"
    assert bundle.pipeline_path("miniature/retromae") == ROOT / "params" / "miniature" / "retromae.yaml"
    assert bundle.pipeline_path("quickstart.yaml") == ROOT / "params" / "quickstart.yaml"
    assert "miniature/lexmae" in bundle.pipelines()


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("run: mine\n")
    assert bundle.pipeline_path("quickstart") == Path("quickstart")


def test_an_unknown_pipeline_lists_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "quickstrat"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: quickstrat: no such pipeline file") and "quickstart" in err and "\n" not in err
    with pytest.raises(ReprolibError, match="not a shipped pipeline"):
        bundle.pipeline_path("params/nothing.yaml")


def test_notebooks_copies_the_course_and_never_overwrites_without_force(tmp_path, capsys):
    dest = tmp_path / "course"
    assert main(["notebooks", str(dest)]) == 0
    copied = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert copied == checkout_files()
    assert (dest / "notebooks" / "20_finetune_dense.ipynb").read_bytes() == \
           (ROOT / "notebooks" / "20_finetune_dense.ipynb").read_bytes()

    edited = dest / "notebooks" / "00_prepare_data.ipynb"
    edited.write_text("a student's edits")
    capsys.readouterr()
    assert main(["notebooks", str(dest)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert edited.read_text() == "a student's edits"
    assert main(["notebooks", str(dest), "--force"]) == 0
    assert edited.read_bytes() == (ROOT / "notebooks" / "00_prepare_data.ipynb").read_bytes()


@pytest.mark.slow
def test_a_wheel_carries_the_course_and_runs_a_shipped_pipeline_from_an_empty_directory(tmp_path):
    """The non-editable install: build the wheel, unpack it where nothing else is, and run the quickstart's
    first stage by name from an empty directory (the kernel imports the unpacked copy too)."""
    source, wheels, site, work = (tmp_path / name for name in ("source", "wheels", "site", "work"))
    work.mkdir()
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "reprolib", "notebooks", "params"):   # a build writes beside its source
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copyfile
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__", "outputs")}
                                           if (ROOT / name).is_dir() else {}))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(source), "-w", str(wheels)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("reprolib-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"reprolib/bundled/{f}" for f in checkout_files()} <= names

    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "from reprolib import bundle; print(bundle.root())"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()) == site / "reprolib" / "bundled"

    run = subprocess.run([sys.executable, "-m", "reprolib", "run", "quickstart", "--only", "data", "--out", "out"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (work / "out" / "quickstart" / "data" / "corpus.tsv").is_file()
