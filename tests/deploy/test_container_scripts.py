"""container/check-prerequisites.sh, which the container scripts run first: it names each missing
tool and the Debian package to install, and passes when all are there."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tools.servers import REPO

SCRIPT = REPO / "container" / "check-prerequisites.sh"
TOOLS = ["buildah", "podman", "runc", "debootstrap", "curl", "podman-compose"]


def check(path_dir: Path, *args: str, cni_dir: Path | None = None) -> subprocess.CompletedProcess:
    # Only the test's own folders: the host's may hold the real plugin.
    env = {"PATH": str(path_dir), "CNI_PLUGIN_DIRS": str(cni_dir or path_dir / "none")}
    return subprocess.run([shutil.which("bash"), str(SCRIPT), *args], env=env, capture_output=True, text=True)


def stub(directory: Path, *names: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_text("#!/bin/sh\n")
        (directory / name).chmod(0o755)


def test_every_missing_tool_is_named_with_its_package(tmp_path):
    stub(tmp_path / "bin", "id")  # the script asks `id -u`
    (tmp_path / "bin" / "id").write_text("#!/bin/sh\necho 0\n")
    result = check(tmp_path / "bin", "compose")
    assert result.returncode == 1
    for line in [
        "buildah (apt-get install buildah)",
        "runc (apt-get install runc)",
        "debootstrap (apt-get install debootstrap)",
        "podman-compose (apt-get install podman-compose)",
        "dnsname plugin (apt-get install golang-github-containernetworking-plugin-dnsname)",
    ]:
        assert line in result.stderr


def test_all_present_passes_silently_and_root_is_asked_for(tmp_path):
    stub(tmp_path / "bin", *TOOLS)
    stub(tmp_path / "cni", "dnsname")
    (tmp_path / "bin" / "id").write_text("#!/bin/sh\necho 0\n")
    (tmp_path / "bin" / "id").chmod(0o755)
    result = check(tmp_path / "bin", "compose", cni_dir=tmp_path / "cni")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    (tmp_path / "bin" / "id").write_text("#!/bin/sh\necho 1000\n")
    result = check(tmp_path / "bin", cni_dir=tmp_path / "cni")
    assert result.returncode == 1 and "root:" in result.stderr
