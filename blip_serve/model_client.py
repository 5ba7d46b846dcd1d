"""The API service's calls to the model service: one bounded retry loop, and what each failure
means for the client."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
from bentoml.exceptions import BentoMLException

from .errors import Unavailable
from .jobs import CaptionJob, CaptionResult

ATTEMPTS = 2


def lost_on_its_connection(exc: BaseException) -> bool:
    """The call was lost to the connection, not to the model, and is safe to send again (captioning
    has no side effects):
    - a keep-alive connection the model server had closed, or a model worker that died
      (aiohttp.ClientConnectionError), also while it was sending its answer (ClientPayloadError);
    - BentoML's client closing its session under a request in flight (aiohttp raises a bare
      RuntimeError "Session is closed"; BentoML issues #4971, #5544)."""
    return isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError) or (
        isinstance(exc, RuntimeError) and "Session is closed" in str(exc)
    )


def queue_full(exc: BaseException) -> bool:
    """BentoML's batch queue cannot serve the call within its latency budget (max_latency_ms)."""
    return isinstance(exc, BentoMLException) and exc.error_code == 503


async def send_jobs(
    call: Callable[[list[CaptionJob]], Awaitable[list[CaptionResult]]], jobs: list[CaptionJob]
) -> list[CaptionResult]:
    """`call(jobs)`, sent once more if it was lost on its connection. Raises Unavailable (503,
    Retry-After) when the queue is full or the model worker is being replaced; anything else is a
    server fault and propagates."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await call(jobs)
        except Exception as exc:
            if queue_full(exc):
                raise Unavailable("the server is at capacity; retry shortly") from None
            if not lost_on_its_connection(exc):
                raise
            if attempt == ATTEMPTS:
                # Lost twice: the model worker is gone, and BentoML's supervisor is starting a new one.
                raise Unavailable("the captioning model is restarting; retry shortly") from None
    raise AssertionError("unreachable")
