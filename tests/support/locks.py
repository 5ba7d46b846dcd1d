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


# `name[extra, ...]==version --hash=sha256:... ...`, as lock.sh writes each pin
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[([^\]]*)\])?==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(name: str | Path) -> list[tuple[str, frozenset[str], str, list[str]]]:
    """Each pin of a lock as pip reads it: (canonical name, extras, version, hashes)."""
    text = (REPO / name).read_text().replace("\\\n", " ")  # pip joins continued lines
    pins = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "--find-links")):
            continue
        match = PIN.fullmatch(line)
        assert match, f"{name}: not an exact, hashed pin: {line[:120]}"
        package, extras, version, hashes = match.groups()
        extras = frozenset(canonical(e.strip()) for e in (extras or "").split(",") if e.strip())
        pins.append((canonical(package), extras, version, hashes.split()))
    return pins


def read_lock(name: str | Path) -> dict[str, tuple[str, list[str]]]:
    """A lock at the repository's root by name, or any requirements file by path."""
    pins = {}
    for package, _extras, version, hashes in read_pins(name):
        # A package named twice (BentoML appends its own bare `bentoml==` pin to a bento's copy;
        # lock.sh pins a package asked for with an extra both with it and bare): pip takes both if
        # the versions agree, and checks the file against the hashes of both.
        earlier_version, earlier_hashes = pins.get(package, (version, []))
        assert earlier_version == version, f"{name}: {package} pinned to {earlier_version} and {version}"
        pins[package] = (version, earlier_hashes + hashes)
    return pins
