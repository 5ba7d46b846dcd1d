"""What a second `bentoml serve` beside a first would break, refused at start with one line each.

One server per BENTOML_HOME: BentoML keeps Prometheus' multiprocess files in
`$BENTOML_HOME/prometheus_multiproc_dir` and empties that folder whenever a server starts, so two
servers under one home silently lose each other's series. The supervisor of `bentoml serve` takes
this lock when it loads service.py. And one server per port: BentoML would print a 57-line
traceback for a port in use; `check_port` says it in one line first.
"""

from __future__ import annotations

import atexit
import errno
import os
import socket
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
            "each other's /metrics. Give this one its own home and port: "
            "BENTOML_HOME=/some/other/dir bentoml serve --port 3001"
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


class PortInUse(SystemExit):
    """The address `bentoml serve` is to listen on is taken, or not this process's to take."""


def serve_address(argv: list[str] | None = None, environ=None) -> tuple[str, int]:
    """Where `bentoml serve` will listen: its --host and --port (-p) options, else BENTOML_HOST and
    BENTOML_PORT (click reads the same variables), else BentoML's defaults."""
    argv = sys.argv[2:] if argv is None else argv
    environ = os.environ if environ is None else environ
    found = {"host": environ.get("BENTOML_HOST", "0.0.0.0"), "port": environ.get("BENTOML_PORT", "3000")}
    flags = {"--host": "host", "--port": "port", "-p": "port"}
    for arg, following in zip(argv, [*argv[1:], None]):
        flag, equals, value = arg.partition("=")
        if equals and flag in flags:  # --port=3001
            found[flags[flag]] = value
        elif arg in flags and following is not None:  # --port 3001
            found[flags[arg]] = following
        elif arg.startswith("-p") and arg[2:].isdigit():  # -p3001
            found["port"] = arg[2:]
    return found["host"], int(found["port"]) if found["port"].isdigit() else 3000


def check_port(host: str, port: int) -> None:
    """Stop with one line when `host:port` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own socket
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"port {port} on {host} is in use (another server?): serve on another with "
                    f"`bentoml serve --port {port + 1}`, or find what holds it: ss -ltnp 'sport = :{port}'"
                ) from None
            if exc.errno == errno.EACCES:
                raise PortInUse(
                    f"port {port} needs privileges this user lacks: use a port above 1023 (--port)"
                ) from None
            # anything else (an unknown host, say): BentoML reports it as it binds
