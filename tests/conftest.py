from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tools.servers import ServerProcess, bento_server
from tools.tiny_model import make_blip

# Servers the tests start compile only where a test asks (test_compile.py): on a CPU with AMX,
# BLIP_COMPILE=auto would compile every test server's model for a minute or more.
os.environ.setdefault("BLIP_COMPILE", "off")

SERVERS_STARTED: list[str] = []  # every server process a test started: reported at the end of the run


def count_starts(start):
    def counted(self, *args, **kwargs):
        SERVERS_STARTED.append(self.command[1] if len(self.command) > 1 else self.command[0])
        return start(self, *args, **kwargs)

    return counted


ServerProcess.start = count_starts(ServerProcess.start)


def pytest_terminal_summary(terminalreporter):
    if SERVERS_STARTED:
        terminalreporter.write_line(f"servers started: {len(SERVERS_STARTED)}")


def pytest_collection_modifyitems(config, items):
    """Container tests build OCI images (minutes, buildah and podman): they run only when `-m` names
    them (`pytest -m container`), so `pytest -m "not slow"` stays quick."""
    if "container" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if "container" in item.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if "container" not in item.keywords]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return str(make_blip(tmp_path_factory.mktemp("tiny-blip")))


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory) -> ServerProcess:
    """The real `bentoml serve` with the tiny model, exact precision, shared by most tests."""
    env = {"BLIP_MODEL": tiny_model_dir, "BLIP_PRECISION": "fp32"}
    with bento_server(env, tmp_path_factory.mktemp("logs") / "bentoml.log") as running:
        yield running


@pytest.fixture(scope="session")
def reference(tiny_model_dir):
    from support.reference import ReferenceCaptioner

    return ReferenceCaptioner(tiny_model_dir)


@pytest.fixture
def nginx_prefix():
    """A folder for one nginx run. Not pytest's tmp_path: its folders are root-only, and nginx's
    workers run as nobody."""
    prefix = Path(tempfile.mkdtemp(prefix="blip-nginx-"))
    yield prefix
    shutil.rmtree(prefix, ignore_errors=True)
