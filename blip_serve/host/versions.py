"""The one version gate for host/: the releases whose private code or behaviour blip-serve relies on.
patches.apply() checks it in every server process at import, before anything in host/ runs."""

from __future__ import annotations

import importlib.metadata

# The releases whose private code or behaviour blip-serve relies on; the lock (requirements.txt)
# pins each, and tests/unit/host/test_versions.py fails when the two disagree. Upgrading one is a
# deliberate change: bump it in requirements/server.in, refresh the lock, re-check every use named here.
WRITTEN_FOR = {
    "bentoml": "1.4.40",  # patches; home_lock (BentoMLContainer); runner (BENTOML_RUNNER_MAP); drain (worker argv)
    "uvicorn": "0.54.0",  # patches: time_out_silent_connections, use_h11; drain (handle_exit's force_exit, Server.lifespan)
    "kantoku": "0.18.3",  # BentoML's fork of circus, which installs the `circus` module: patches.remove_sockets_after_workers
    "aiohttp": "3.14.5",  # runner.session_closed: the text of its "Session is closed" RuntimeError
}


def check_versions() -> None:
    for package, version in WRITTEN_FOR.items():
        installed = importlib.metadata.version(package)
        if installed != version:
            raise RuntimeError(
                f"blip-serve relies on private code of {package} {version}, and {package} "
                f"{installed} is installed: install the lock (pip install -r requirements.txt), or check each "
                "patch against the new release and update WRITTEN_FOR"
            )
