"""schemathesis against the server's own OpenAPI document: whatever it generates, no 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts the real server

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))


def test_no_server_errors_from_generated_requests(server, tmp_path):
    result = subprocess.run(
        [
            SCHEMATHESIS,
            "run",
            f"{server.url}/docs.json",
            "--url",
            server.url,
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "60",
            "--request-timeout",
            "60",
            "--include-path-regex",
            "^/(captions?|v1/chat/completions)$",
            "--seed",
            "1",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr

    assert result.returncode == 0, output[-6000:]
    assert "Tested: 3" in output  # /caption (three bodies), /captions and /v1/chat/completions
