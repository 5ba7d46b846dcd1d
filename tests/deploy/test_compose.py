"""docker-compose.yml validates against the Compose specification and agrees with nginx/nginx.conf."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools.servers import REPO

CHECK_JSONSCHEMA = str(Path(sys.executable).with_name("check-jsonschema"))


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.gpu.yml"])
def test_compose_files_follow_the_compose_spec(name):
    result = subprocess.run(
        [CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec", str(REPO / name)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_service_names_and_ports_agree_with_nginx():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    nginx = (REPO / "nginx" / "nginx.conf").read_text()
    host, port = re.search(r"upstream bento \{[^}]*server (\w+):(\d+)", nginx).groups()
    assert host in compose["services"]
    assert port in compose["services"][host]["expose"]
    assert "${BLIP_HTTP_PORT:-80}:80" in compose["services"]["nginx"]["ports"] and "listen 80;" in nginx
    assert "/tmp/nginx" in compose["services"]["nginx"]["tmpfs"] and "pid /tmp/nginx/" in nginx
    assert "./nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in compose["services"]["nginx"]["volumes"]
    check = compose["services"][host]["healthcheck"]["test"]
    assert isinstance(check, str) and "/readyz" in check  # string form: see docker-compose.yml
    gpu = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())
    devices = gpu["services"][host]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert gpu["services"][host]["image"] == "${BLIP_IMAGE:-blip-serve-gpu:latest}"  # bentofile.gpu.yaml's


def test_no_empty_default_that_podman_compose_would_pass_literally():
    """podman-compose 1.0.3 (Debian 12) passes "${X:-}" through as text: BLIP_MODEL would become the
    hub id "${BLIP_MODEL:-}". Optional settings are passed by bare name instead."""
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        assert ":-}" not in (REPO / name).read_text(), name
    environment = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["bento"]["environment"]
    assert "BLIP_MODEL" in environment and "BLIP_API_KEY" in environment
