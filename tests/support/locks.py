"""The lock files at the repository's root, read as pip reads them: name -> (version, hashes)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCKS = ("requirements.txt", "requirements-gpu.txt", "requirements-bench.txt", "requirements-test.txt")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(name: str) -> dict[str, tuple[str, list[str]]]:
    text = (REPO / name).read_text().replace("\\\n", " ")  # pip joins continued lines
    pins = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "--find-links")):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", line)
        assert match, f"{name}: not an exact, hashed pin: {line[:120]}"
        package, version, hashes = match.groups()
        pins[canonical(package)] = (version, hashes.split())
    return pins
