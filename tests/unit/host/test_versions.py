"""blip_serve/host/versions.py: the one gate for every private touch in host/, held to every lock."""

from __future__ import annotations

import pytest

from blip_serve.host import versions
from support.locks import LOCKS, read_lock


@pytest.mark.parametrize("lock", LOCKS)
def test_every_lock_installs_the_releases_the_patches_were_written_for(lock):
    """An upgrade of a patched host is one deliberate change: the lock and WRITTEN_FOR move together,
    and each patch is re-checked against the new release."""
    pins = read_lock(lock)
    locked = {package: pins[package][0] for package in versions.WRITTEN_FOR}
    assert locked == versions.WRITTEN_FOR


def test_the_circus_module_comes_from_bentomls_fork_alone():
    """kantoku installs `circus`; the original circus package would overwrite its files."""
    import importlib.metadata

    assert importlib.metadata.packages_distributions()["circus"] == ["kantoku"]


def test_another_release_of_a_patched_package_stops_the_start(monkeypatch):
    versions.check_versions()  # the installed ones: fine
    monkeypatch.setitem(versions.WRITTEN_FOR, "uvicorn", "0.1.0")
    with pytest.raises(RuntimeError, match=r"relies on private code of uvicorn 0\.1\.0, and uvicorn .* is installed"):
        versions.check_versions()
