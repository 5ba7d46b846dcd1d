"""Graceful drain on SIGTERM (a rolling update, a scale-down, `docker compose stop`).

BentoML's supervisor passes SIGTERM to every worker at once, and uvicorn then stops accepting at
once: a proxy that still routes to the replica has its new connections hang (the listening socket
stays open in the supervisor), and an API worker that had not yet sent an accepted request to the
model worker finds it gone. So each worker wraps uvicorn's SIGTERM handler:

- the API worker keeps serving for BLIP_DRAIN_S with /readyz answering 503, so health checks take
  the replica out of rotation, then hands over to uvicorn (no new connections) and exits once the
  caption requests in flight (CaptionsInFlight) are answered;
- the model worker keeps serving until the API workers beside it have exited (their requests are
  all answered), at most BLIP_DRAIN_S + BLIP_REQUEST_TIMEOUT_S, then exits likewise.

Each then makes uvicorn exit without waiting for the rest: uvicorn's own graceful shutdown also
waits for every other task, and a /readyz whose client gave up while the model was still loading
left one that never ended, so the worker never exited. Exiting so (`force_exit`) also skips the
app's shutdown, so the worker runs it first: the services' `on_shutdown` hooks, and BentoML's
clients removing their `bentoml-client-*` folders (left in the temp folder at every stop otherwise:
uvicorn then re-raises SIGTERM, and the process dies without running its exit handlers).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from blip_serve.shared.routes import caption_paths

logger = logging.getLogger("bentoml.blip_serve")
POLL_S = 0.5
APP_SHUTDOWN_S = 10  # the most the app's shutdown may take before the worker exits anyway


class Drain:
    def __init__(
        self,
        seconds: float,
        wait_for: Callable[[], list[psutil.Process]] | None = None,
        in_flight: InFlight | None = None,
        longest_s: float = 0.0,
    ):
        """Serve on for `seconds` after SIGTERM; also until the processes `wait_for` named at SIGTERM
        have exited; then stop accepting, and exit once `in_flight` is zero. Never longer than
        `longest_s` (at least `seconds`) after SIGTERM."""
        self.seconds = seconds
        self.wait_for = wait_for
        self.in_flight = in_flight
        self.longest_s = max(longest_s, seconds)
        self.since: float | None = None
        self.waited: list[psutil.Process] = []

    @property
    def draining(self) -> bool:
        return self.since is not None

    def install(self) -> None:
        """Wrap the SIGTERM handler uvicorn installed (call from the worker's event loop, after
        uvicorn started: a BentoML startup hook)."""
        loop = asyncio.get_running_loop()
        handler = signal.getsignal(signal.SIGTERM)
        if not callable(handler):
            return  # not under uvicorn's signal handling: nothing to delay

        def on_sigterm(signum, frame) -> None:
            if self.since is not None:  # a second SIGTERM: stop draining now
                handler(signum, frame)
                return
            self.since = time.monotonic()
            # Named now: a process BentoML's supervisor respawns while stopping is not waited for.
            self.waited = self.wait_for() if self.wait_for else []
            logger.info("SIGTERM: draining (/readyz 503) for %g s, then finishing requests in flight", self.seconds)
            loop.call_soon_threadsafe(lambda: loop.create_task(self.hand_over(handler, signum, frame)))

        signal.signal(signal.SIGTERM, on_sigterm)

    async def hand_over(self, handler, signum, frame) -> None:
        await asyncio.sleep(self.seconds)
        while any(running(p) for p in self.waited) and not self.overdue():
            await asyncio.sleep(POLL_S)
        handler(signum, frame)  # uvicorn: no new connections from here on
        logger.info("drained: no new connections now; exiting once the requests in flight are answered")
        while self.in_flight is not None and self.in_flight.count and not self.overdue():
            await asyncio.sleep(POLL_S / 5)
        server = getattr(handler, "__self__", None)  # the uvicorn.Server whose handle_exit this is
        if server is not None:
            await shut_down_app(server)
            server.force_exit = True

    def overdue(self) -> bool:
        return time.monotonic() - self.since >= self.longest_s


async def shut_down_app(server) -> None:
    """The app's lifespan shutdown, which uvicorn skips once `force_exit` is set (a second call, if
    uvicorn got there first, returns at once)."""
    lifespan = getattr(server, "lifespan", None)
    if lifespan is None:
        return
    try:
        await asyncio.wait_for(lifespan.shutdown(), APP_SHUTDOWN_S)
    except Exception:  # exiting anyway: say why the hooks did not finish
        logger.exception("the app's shutdown did not finish; exiting without it")


class InFlight:
    """How many caption requests this process has started and not yet finished answering: the
    handle CaptionsInFlight counts into and a Drain waits on."""

    def __init__(self) -> None:
        self.count = 0


class CaptionsInFlight:
    """ASGI middleware counting the requests to `paths` into `counter` while they run."""

    def __init__(self, app, counter: InFlight, paths: tuple[str, ...] = caption_paths()):
        self.app = app
        self.counter = counter
        self.paths = paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        self.counter.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.counter.count -= 1


def service_workers(service_name: str) -> list[psutil.Process]:
    """The workers of BentoML service `service_name` beside this process: BentoML's supervisor
    starts each with `--service-name <name>` (_bentoml_impl.worker.service)."""
    try:
        siblings = psutil.Process(os.getppid()).children()
    except psutil.Error:
        return []
    workers = []
    for process in siblings:
        try:
            command = process.cmdline()
        except psutil.Error:
            continue
        named = any(a == "--service-name" and b == service_name for a, b in zip(command, command[1:]))
        if process.pid != os.getpid() and named:
            workers.append(process)
    return workers


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def forget_dead_workers_gauges() -> None:
    """Drop the live gauges (multiprocess mode livesum: requests in progress, images queued and in
    a batch) that dead processes left in BentoML's Prometheus folder. prometheus_client forgets a
    process only when told, so a killed worker's counts were read on forever (and KEDA scaled on
    them). Called by each worker as it starts: a worker that dies is replaced at once."""
    from prometheus_client import multiprocess

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    for path in Path(folder).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            multiprocess.mark_process_dead(int(pid), folder)
