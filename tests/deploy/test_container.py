"""The container smoke tests: hermetic image with buildah, run with podman, and the compose stack
under podman-compose. Not in the default run (minutes, ~2 GB of downloads): `pytest -m container`."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tools.servers import REPO

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(
        not all(shutil.which(tool) for tool in ("buildah", "podman", "runc", "debootstrap")) or os.geteuid() != 0,
        reason="needs root and buildah, podman, runc, debootstrap (apt-get install buildah podman runc debootstrap)",
    ),
]


def run_script(script: str, tmp_path) -> str:
    """Run a container/ script with a BentoML home of its own; its stdout, once it succeeded."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    env.pop("BLIP_MODEL", None)
    result = subprocess.run(["bash", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
    output = result.stdout + result.stderr
    print(output[-3000:])
    assert result.returncode == 0, output[-6000:]
    return result.stdout


def test_container_smoke_script(tmp_path):
    stdout = run_script("container/smoke.sh", tmp_path)
    assert "container smoke: OK" in stdout
    assert "container user: bentoml" in stdout
    assert "ready with --network none: yes" in stdout


@pytest.mark.skipif(
    shutil.which("podman-compose") is None, reason="needs podman-compose (apt-get install podman-compose)"
)
def test_compose_smoke_script(tmp_path):
    """docker-compose.yml under podman-compose: two replicas behind nginx, one killed."""
    stdout = run_script("container/compose-smoke.sh", tmp_path)
    assert "compose smoke: OK" in stdout
    assert "bento replicas that answered through nginx: 2" in stdout
    assert "requests through nginx after the kill: 20/20 answered 200" in stdout
    assert "killed replica restarted by its restart policy, now healthy" in stdout
