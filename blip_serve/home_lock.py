"""One `bentoml serve` per BENTOML_HOME: a second one would wipe the first one's /metrics.

BentoML keeps Prometheus' multiprocess files in `$BENTOML_HOME/prometheus_multiproc_dir` and empties
that folder whenever a server starts, so two servers under one home silently lose each other's
series. The supervisor of `bentoml serve` takes this lock when it loads service.py; a second
server under the same home stops with one line that says what to do.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

import psutil

LOCK_NAME = "blip-serve.pid"


class HomeInUse(SystemExit):
    """Another live blip-serve server uses this BENTOML_HOME."""


def take(home: str | os.PathLike | None = None) -> None:
    """Hold `home` (BentoML's home by default) for this process, or stop if a live server holds it."""
    if home is None:
        from bentoml._internal.configuration.containers import BentoMLContainer  # BentoML's own rule for its home

        home = BentoMLContainer.bentoml_home.get()
    lock = Path(home) / LOCK_NAME
    holder = read_pid(lock)
    if holder and holder != os.getpid() and is_bentoml(holder):
        raise HomeInUse(
            f"another blip-serve server (pid {holder}) uses BENTOML_HOME={home}: both would share and wipe "
            "each other's /metrics. Give this one its own: BENTOML_HOME=/some/other/dir bentoml serve"
        )
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(str(os.getpid()))
    except OSError:  # a home this process cannot write: BentoML will say so itself
        return
    atexit.register(release, lock)


def release(lock: Path) -> None:
    if read_pid(lock) == os.getpid():
        lock.unlink(missing_ok=True)


def read_pid(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def is_bentoml(pid: int) -> bool:
    try:
        return any("bentoml" in part for part in psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def is_serve_supervisor() -> bool:
    """This process is `bentoml serve` itself (not a worker, not `bentoml build`)."""
    import bentoml

    command = [Path(sys.argv[0]).name, *sys.argv[1:2]] if sys.argv else []
    return command == ["bentoml", "serve"] and bentoml.server_context.worker_index is None
