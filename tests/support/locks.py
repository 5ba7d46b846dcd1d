"""The lock files at the repository's root, read as pip reads them: name -> (version, hashes)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCKS = (
    "requirements.txt",
    "requirements-gpu.txt",
    "requirements-bench.txt",
    "requirements-test.txt",
    "requirements-bench-gpu.txt",
)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(name: str | Path) -> dict[str, tuple[str, list[str]]]:
    """A lock at the repository's root by name, or any requirements file by path."""
    text = (REPO / name).read_text().replace("\\\n", " ")  # pip joins continued lines
    pins = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "--find-links")):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", line)
        assert match, f"{name}: not an exact, hashed pin: {line[:120]}"
        package, version, hashes = match.groups()
        # A package named twice (BentoML appends its own bare `bentoml==` pin to a bento's copy):
        # pip takes both if the versions agree, and checks the file against the hashes of both.
        earlier_version, earlier_hashes = pins.get(canonical(package), (version, []))
        assert earlier_version == version, f"{name}: {package} pinned to {earlier_version} and {version}"
        pins[canonical(package)] = (version, earlier_hashes + hashes.split())
    return pins
