"""`pip install .` as a user of the client runs it: a fresh venv without BentoML or torch gets
blip_serve/client/ (and the two shared modules) from the client lock, and `blip-caption` runs."""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from tools.servers import REPO, free_port

pytestmark = pytest.mark.slow


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def test_pip_install_dot_installs_the_client_alone_and_blip_caption_runs(tmp_path):
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    # As the README says: the client's lock, then the package without resolving again.
    installed = run([python, "-m", "pip", "install", "-q", "-r", REPO / "requirements-client.txt"])
    assert installed.returncode == 0, installed.stderr
    source = tmp_path / "clone"  # setuptools builds in the source tree: a copy keeps the checkout clean
    shutil.copytree(REPO / "blip_serve", source / "blip_serve", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", source)
    installed = run([python, "-m", "pip", "install", "-q", "--no-deps", "."], cwd=source)
    assert installed.returncode == 0, installed.stderr

    files = run([python, "-m", "pip", "show", "-f", "blip-serve"]).stdout
    modules = sorted(
        line.strip()
        for line in files.splitlines()
        if line.strip().startswith("blip_serve/") and line.strip().endswith(".py")
    )
    assert modules == [
        "blip_serve/__init__.py",
        "blip_serve/client/__init__.py",
        "blip_serve/client/__main__.py",
        "blip_serve/client/cli.py",
        "blip_serve/client/library.py",
        "blip_serve/formats.py",
    ]
    assert run([python, "-c", "import bentoml"]).returncode != 0  # not pulled in
    assert run([python, "-c", "import torch"]).returncode != 0

    blip_caption = str(Path(python).parent / "blip-caption")
    assert run([blip_caption, "--help"]).returncode == 0
    refused = run([blip_caption, REPO / "examples" / "sample.jpg", "--url", f"http://127.0.0.1:{free_port()}"])
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "127.0.0.1" in refused.stderr  # it says which server it could not reach
