"""The locks (requirements/lock.sh writes them): every package pinned with its files' hashes, the
server's versions the same in every lock, and the requirements they were made from all in them."""

from __future__ import annotations

import re

import pytest

from support.locks import LOCKS, REPO, canonical, read_lock, read_pins


@pytest.mark.parametrize("lock", LOCKS)
def test_every_package_is_pinned_with_hashes(lock):
    pins = read_lock(lock)
    assert len(pins) > 80  # the whole tree, not the direct requirements alone
    for package, (version, hashes) in pins.items():
        assert hashes, f"{lock}: {package}=={version} has no hash"


def requirement_names(source: str) -> set[str]:
    names = set()
    for line in (REPO / "requirements" / source).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(canonical(re.split(r"[=<>~! \[]", line, maxsplit=1)[0]))
    return names


@pytest.mark.parametrize(
    ("lock", "sources"),
    [
        ("requirements.txt", ["server.in", "cpu.in"]),
        ("requirements-gpu.txt", ["server.in", "gpu.in"]),
        ("requirements-bench.txt", ["server.in", "bench.in"]),
        ("requirements-test.txt", ["server.in", "bench.in", "test.in"]),
        ("requirements-bench-gpu.txt", ["server.in", "bench.in", "gpu.in"]),
    ],
)
def test_each_lock_holds_what_it_was_made_from(lock, sources):
    missing = set().union(*(requirement_names(s) for s in sources)) - set(read_lock(lock))
    assert not missing, f"{lock} lacks {sorted(missing)}: run bash requirements/lock.sh"


# Each lock resolved within a server's lock (lock.sh: --constraint).
BUILT_ON_THE_SERVERS = [
    ("requirements.txt", "requirements-bench.txt"),
    ("requirements.txt", "requirements-test.txt"),
    ("requirements-gpu.txt", "requirements-bench-gpu.txt"),
]


@pytest.mark.parametrize(("server_lock", "lock"), BUILT_ON_THE_SERVERS)
def test_bench_and_test_locks_install_the_servers_versions(server_lock, lock):
    server, other = read_lock(server_lock), read_lock(lock)
    differ = {p: (server[p][0], other[p][0]) for p in server if other.get(p, server[p])[0] != server[p][0]}
    assert set(server) <= set(other) and not differ, f"{lock} differs from {server_lock}: {differ}"


def test_cpu_locks_take_torchs_cpu_build_and_the_gpu_lock_the_cuda_one():
    for lock in ("requirements.txt", "requirements-bench.txt", "requirements-test.txt"):
        assert read_lock(lock)["torch"][0].endswith("+cpu"), lock
        assert "--find-links https://download.pytorch.org/whl/cpu/torch/" in (REPO / lock).read_text()
    for lock in ("requirements-gpu.txt", "requirements-bench-gpu.txt"):
        gpu = read_lock(lock)
        assert "+" not in gpu["torch"][0] and "nvidia-cublas" in gpu, lock
        assert gpu["torch"][0] == read_lock("requirements.txt")["torch"][0].removesuffix("+cpu")
        assert "find-links" not in (REPO / lock).read_text()


def test_the_client_lock_holds_pyprojects_dependencies_at_the_servers_versions():
    """`pip install .` installs blip_serve/client/ alone; requirements-client.txt is its lock."""
    import tomllib

    client, server = read_lock("requirements-client.txt"), read_lock("requirements.txt")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {canonical(re.split(r"[=<>~! \[]", d, maxsplit=1)[0]) for d in declared}
    assert wanted == requirement_names("client.in") and wanted <= set(client)
    for package, (version, hashes) in client.items():
        assert hashes and server[package][0] == version, package
    assert not {"bentoml", "torch", "fastapi", "numpy"} & set(client)


@pytest.mark.parametrize("lock", ["requirements.txt", "requirements-bench.txt", "requirements-test.txt"])
def test_a_package_asked_for_with_an_extra_is_pinned_with_it_and_bare(lock):
    """litserve asks for `uvicorn[standard]>=0.29`, bentoml for `uvicorn>=0.22`. pip checks each
    against the pins of its own name and extras: when the lock pinned uvicorn bare only, pip took
    the newest uvicorn for litserve's, and every fresh install failed its hash check the day
    uvicorn 0.55.0 came out. Read from the installed packages' own metadata (the test venv holds
    these locks' versions)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    pins = read_pins(lock)
    locked = {(package, extras) for package, extras, _version, _hashes in pins}
    wanted_extras, versions = {}, {}
    for package, extras, version, _hashes in pins:
        wanted_extras.setdefault(package, {""}).update(extras)
        versions[package] = version
    asked = set()
    for package, version in versions.items():
        dist = metadata.distribution(package)
        assert canonical(dist.version) == canonical(version), f"the test venv has {package} {dist.version}"
        for line in dist.requires or []:
            need = Requirement(line)
            if need.extras and any(
                need.marker is None or need.marker.evaluate({"extra": e}) for e in wanted_extras[package]
            ):
                asked.add((canonical(need.name), frozenset(canonical(e) for e in need.extras), package))
    assert ("uvicorn", frozenset({"standard"}), "litserve") in asked or lock == "requirements.txt"
    for name, extras, by in asked:
        assert any(n == name and extras <= e for n, e in locked), (
            f"{lock}: {by} asks for {name}{sorted(extras)}: not pinned with it"
        )
        assert (name, frozenset()) in locked, f"{lock}: {name} is pinned with extras only, not bare"


# Installed, uvloop changes how the server runs: uvicorn's "auto" loop takes it (httptools would
# change its HTTP parser, but host/patches.use_h11 keeps h11 whatever is installed). The test and
# bench locks have it through litserve's uvicorn[standard]; for the tests to run the event loop that
# serves, the server's locks must have it too (before, a bento served on asyncio's own loop).
INSTALLED_CHANGES_HOW_IT_SERVES = ["uvloop"]


@pytest.mark.parametrize(("server_lock", "lock"), BUILT_ON_THE_SERVERS)
def test_the_server_runs_on_the_event_loop_its_tests_ran(server_lock, lock):
    server, other = read_lock(server_lock), read_lock(lock)
    for package in INSTALLED_CHANGES_HOW_IT_SERVES:
        assert (package in server) == (package in other), f"{package}: in {lock} but not in {server_lock}"
