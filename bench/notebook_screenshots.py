"""Look at executed notebooks as a student would: JupyterLab in headless Chromium, one screenshot each.

    .venv/bin/pip install -e ".[lab]"; apt-get install chromium      # JupyterLab and Debian's Chromium
    .venv/bin/python bench/notebook_screenshots.py outputs/quickstart   # -> bench/results/notebook_screenshots.json

Serves the run folder with JupyterLab (no token, a fresh workspace), opens each executed stage notebook in
Chromium, waits for it to render, and saves a screenshot (`--shots`, default /tmp/notebook_screenshots) and the
rendered page. The page is searched for what a student must never see: stderr output boxes (red), a
TqdmWarning, "Error displaying widget", or a progress bar frozen short of 100%. Exit status 1 if any is found.
"""
import argparse
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchutil import RESULTS, header, write_json

PROBLEMS = {
    "stderr output": 'data-mime-type="application/vnd.jupyter.stderr"',
    "TqdmWarning": "TqdmWarning",
    "broken widget": "Error displaying widget",
    "frozen bar": re.compile(r"\b(?:[0-9]|[1-9][0-9])%\|"),   # a text bar short of 100%
}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def jupyterlab(root):
    """A JupyterLab server on `root`, without a token, with its own settings and workspace folders."""
    port, home = free_port(), tempfile.mkdtemp(prefix="lab-")
    env = dict(os.environ, JUPYTER_CONFIG_DIR=f"{home}/config", JUPYTERLAB_WORKSPACES_DIR=f"{home}/workspaces",
               JUPYTERLAB_SETTINGS_DIR=f"{home}/settings")
    news = Path(home, "settings", "@jupyterlab", "apputils-extension", "notification.jupyterlab-settings")
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')   # no "get notified about Jupyter news?" box over the page
    jupyter = Path(sys.executable).with_name("jupyter")
    server = subprocess.Popen([str(jupyter), "lab", "--no-browser", f"--port={port}", "--IdentityProvider.token=",
                               "--ServerApp.password=", f"--ServerApp.root_dir={root}", "--ServerApp.ip=127.0.0.1",
                               "--allow-root"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=1)
                break
            time.sleep(0.5)
        else:
            raise SystemExit("JupyterLab did not start in 60 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


def chromium(*args, timeout=120):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        raise SystemExit("Chromium is not installed: apt-get install chromium")
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        return subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--user-data-dir={profile}", "--window-size=1400,3000",
                               "--virtual-time-budget=25000", *args], capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a pipeline's run folder, e.g. outputs/quickstart")
    parser.add_argument("--shots", type=Path, default=Path(tempfile.gettempdir()) / "notebook_screenshots")
    parser.add_argument("--out", type=Path, default=RESULTS / "notebook_screenshots.json")
    args = parser.parse_args()
    run_dir = args.run_dir.resolve()
    notebooks = sorted(run_dir.glob("*/[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise SystemExit(f"no executed notebooks under {run_dir}")
    args.shots.mkdir(parents=True, exist_ok=True)
    result = {**header("notebook_screenshots"), "run_dir": str(run_dir), "notebooks": {}}
    with jupyterlab(run_dir) as url:
        for path in notebooks:
            relative = path.relative_to(run_dir).as_posix()
            page = f"{url}/lab/tree/{relative}?reset"
            shot = args.shots / f"{path.parent.name}.png"
            chromium(f"--screenshot={shot}", page)
            dom = chromium("--dump-dom", page).stdout
            found = {name: len(pattern.findall(dom)) if isinstance(pattern, re.Pattern) else dom.count(pattern)
                     for name, pattern in PROBLEMS.items()}
            rendered = dom.count("jp-Cell ")
            result["notebooks"][relative] = {"cells_rendered": rendered, "screenshot": str(shot),
                                             **{name: count for name, count in found.items()}}
            flagged = ", ".join(f"{n} {c}" for n, c in found.items() if c) or "clean"
            print(f"{relative:45s} {rendered:3d} cells rendered  {flagged}", flush=True)
    write_json(args.out, result)
    bad = [name for name, row in result["notebooks"].items()
           if row["cells_rendered"] == 0 or any(row[problem] for problem in PROBLEMS)]
    print(f"{len(notebooks) - len(bad)} of {len(notebooks)} notebooks render clean; screenshots in {args.shots}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
