"""Start and stop the servers the load test compares (and the tests use): the real `bentoml serve`
and the per-request baseline, each on a free port, ready once /readyz says 200, stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def executable(name: str) -> str:
    """A console script of this Python: beside the interpreter, else on PATH (a `pip --target` install)."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name) or str(beside)


BENTOML = executable("bentoml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def wait_until_ready(
    url: str,
    process: subprocess.Popen,
    log_path: Path,
    timeout: float = 300.0,
    ready: int | None = 200,
    path: str = "/readyz",
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        status = http_status(f"{url}{path}")
        if status is not None and (ready is None or status == ready):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{url}{path} not 200 after {timeout}s:\n{log_path.read_text()[-4000:]}")


def stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a server and everything it started: its process group, and every descendant seen while
    it shut down (BentoML's supervisor can respawn a worker as it stops, in a session of its own)."""
    started: set[psutil.Process] = set()

    def note_descendants() -> None:
        try:
            started.update(psutil.Process(process.pid).children(recursive=True))
        except psutil.Error:  # the supervisor is gone already
            pass

    note_descendants()
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            note_descendants()
            time.sleep(0.1)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # workers left behind by a crashed supervisor
    except ProcessLookupError:
        pass
    for leftover in started:
        try:
            leftover.kill()
        except psutil.Error:
            pass
    process.wait()


class ServerProcess:
    """A server command on a free port, in its own process group, ready once /readyz says 200."""

    def __init__(self, command: list[str], port: int, env: dict[str, str], log_path: Path):
        self.command = command
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self.env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", **env}
        self.process: subprocess.Popen | None = None
        self.ready_path = "/readyz"

    def start(self, timeout: float = 300.0, ready: int | None = 200) -> ServerProcess:
        """Start, then wait until /readyz answers `ready` (None: any HTTP answer at all)."""
        self.log = open(self.log_path, "wb")  # noqa: SIM115  (open while the server runs; closed by stop)
        self.process = subprocess.Popen(
            self.command, cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_until_ready(self.url, self.process, self.log_path, timeout, ready, self.ready_path)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.log.close()
            self.process = None

    def cpu_seconds(self) -> dict[str, float | None]:
        """CPU time (user + system) of the server's processes so far, those that ended included:
        "total"; for blip-serve also "api" (its API workers with their decode processes), "decode"
        (those decode processes alone), "model" (its model workers) and "model_loop" (their main
        threads: the event loop that receives calls, batches and answers; BLIP runs in other threads);
        None where a server has no such processes."""
        seconds = {"total": 0.0, "api": None, "decode": None, "model": None, "model_loop": None}
        root = psutil.Process(self.process.pid)
        roles: dict[int, str] = {}
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
                command = process.cmdline()
                parent = process.ppid()
            except psutil.Error:  # ended meanwhile: its time is in its parent's children_* now
                continue
            spent = times.user + times.system + times.children_user + times.children_system
            role = "api" if "CaptionAPI" in command else "model" if "BlipModelService" in command else roles.get(parent)
            if role:
                roles[process.pid] = role
                seconds[role] = (seconds[role] or 0.0) + spent
                if role == "api" and roles.get(parent) == "api":
                    seconds["decode"] = (seconds["decode"] or 0.0) + spent
                if role == "model" and "BlipModelService" in command:
                    loop = next((t for t in process.threads() if t.id == process.pid), None)
                    if loop is not None:
                        seconds["model_loop"] = (seconds["model_loop"] or 0.0) + loop.user_time + loop.system_time
            seconds["total"] += spent
        return seconds

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def bento_server(env: dict[str, str], log_path: Path, port: int | None = None) -> ServerProcess:
    """`bentoml serve` from the repo root (bentofile.yaml names the service), BLIP_* from `env`,
    on `port` or a free one."""
    port = port or free_port()
    # A BentoML home of its own: `bentoml serve` clears its home's Prometheus folder on start,
    # which would wipe the /metrics of any other server sharing it.
    home = Path(log_path).parent / f"bentoml-home-{port}"
    # No drain window unless asked for: stopping a test server should not wait BLIP_DRAIN_S.
    env = {"BENTOML_HOME": str(home), "BLIP_DRAIN_S": "0", **env}
    return ServerProcess([BENTOML, "serve", "--host", "127.0.0.1", "--port", str(port)], port, env, log_path)


def baseline_server(env: dict[str, str], log_path: Path, workers: int = 2) -> ServerProcess:
    """The per-request design this project replaces: FastAPI under gunicorn, a model per worker."""
    port = free_port()
    command = [
        executable("gunicorn"),
        "load_test.baseline:app",
        "--worker-class",
        "uvicorn.workers.UvicornWorker",
        "--workers",
        str(workers),
        "--bind",
        f"127.0.0.1:{port}",
        "--timeout",
        "600",
    ]
    return ServerProcess(command, port, env, log_path)


def litserve_server(env: dict[str, str], log_path: Path) -> ServerProcess:
    """BLIP on LitServe with its own batching (load_test.litserve_baseline), a second yardstick."""
    port = free_port()
    command = [sys.executable, "-m", "load_test.litserve_baseline"]
    return ServerProcess(command, port, {**env, "PORT": str(port)}, log_path)
