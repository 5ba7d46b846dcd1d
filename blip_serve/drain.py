"""Graceful drain on SIGTERM (a rolling update, a scale-down, `docker compose stop`).

BentoML's supervisor passes SIGTERM to every worker at once, and uvicorn then stops accepting at
once: a proxy that still routes to the replica has its new connections hang (the listening socket
stays open in the supervisor), and an API worker that had not yet sent an accepted request to the
model worker finds it gone. So each worker wraps uvicorn's SIGTERM handler:

- the API worker keeps serving for BLIP_DRAIN_S with /readyz answering 503, so health checks take
  the replica out of rotation, then hands over to uvicorn, which finishes what is in flight;
- the model worker keeps serving until the API workers beside it have exited (their requests are
  all answered), at most BLIP_DRAIN_S + BLIP_REQUEST_TIMEOUT_S, then hands over likewise.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable

import psutil

logger = logging.getLogger("bentoml.blip_serve")
POLL_S = 0.5


class Drain:
    def __init__(self, seconds: float, until: Callable[[], bool] | None = None, longest_s: float = 0.0):
        """Serve on for `seconds` after SIGTERM; then, if `until` is given, also until it returns
        True or `longest_s` have passed since SIGTERM."""
        self.seconds = seconds
        self.until = until
        self.longest_s = max(longest_s, seconds)
        self.since: float | None = None

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
            logger.info("SIGTERM: draining (/readyz 503) for %g s, then finishing requests in flight", self.seconds)
            loop.call_soon_threadsafe(lambda: loop.create_task(self.hand_over(handler, signum, frame)))

        signal.signal(signal.SIGTERM, on_sigterm)

    async def hand_over(self, handler, signum, frame) -> None:
        await asyncio.sleep(self.seconds)
        while self.until is not None and not self.until() and time.monotonic() - self.since < self.longest_s:
            await asyncio.sleep(POLL_S)
        logger.info("drained: no new connections now; exiting once the requests in flight are answered")
        handler(signum, frame)


def api_workers_gone() -> bool:
    """True once no CaptionAPI worker of this server (a sibling process) is left."""
    try:
        siblings = psutil.Process(os.getppid()).children()
    except psutil.Error:
        return True
    for process in siblings:
        try:
            if process.pid != os.getpid() and "CaptionAPI" in process.cmdline():
                return False
        except psutil.Error:
            continue
    return True
