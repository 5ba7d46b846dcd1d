"""Tests that need a tool besides Python packages (kubectl, node, nginx, prometheus)."""

from __future__ import annotations

import os

import pytest


def require(available: bool, what: str) -> None:
    """Skip where the tool is missing (a developer's machine), fail in CI (.ci/run installs every tool)."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must have {what}")
    pytest.skip(f"needs {what}")
