"""environment.yml (the GPU install) must solve to a stack that pyproject's dependencies accept."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _minimum(spec, name):
    """The x.y lower bound of `name>=x.y` in a list of requirement strings, or None."""
    for item in spec:
        match = re.fullmatch(rf"{re.escape(name)}\s*>=\s*(\d+)\.(\d+)", str(item).strip())
        if match:
            return int(match[1]), int(match[2])
    return None


def test_environment_yml_solves_from_one_channel_to_what_pyproject_needs():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]      # mixing the pytorch channel (last build 2.5.1) with it fails
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    # pyproject allows transformers 5, which disables torch < 2.6: the conda torch must be at least that
    assert _minimum(conda, "pytorch-gpu") >= (2, 6)
    assert _minimum(conda, "faiss-gpu") is not None             # the GPU build; pip's extra is faiss-cpu
    assert any(re.fullmatch(r"-e \.\[.*\]", p) for p in pip)     # the package itself, from the checkout
    python = next(d for d in conda if d.startswith("python="))
    pyproject = (ROOT / "pyproject.toml").read_text()
    low = re.search(r'requires-python = ">=(\d+)\.(\d+)"', pyproject)
    assert tuple(map(int, python.split("=")[1].split("."))) >= (int(low[1]), int(low[2]))
