"""The API service's calls to the model service: one bounded retry loop, and what each failure
means for the client."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import httpx
from bentoml.exceptions import BentoMLException

from blip_serve.host.runner import service_address, session_closed
from blip_serve.shared.errors import Unavailable
from blip_serve.shared.jobs import CaptionJob, CaptionResult

ATTEMPTS = 2


def lost_on_its_connection(exc: BaseException) -> bool:
    """The call was lost to the connection, not to the model, and is safe to send again (captioning
    has no side effects): a keep-alive connection the model server had closed, or a model worker that
    died (aiohttp.ClientConnectionError), also while it was sending its answer (ClientPayloadError);
    or BentoML's client closing its session under a request in flight (host/runner.py)."""
    return isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError) or session_closed(exc)


def queue_full(exc: BaseException) -> bool:
    """The model service's queue holds BLIP_MAX_QUEUED_IMAGES already (blip_serve/model/batcher.py)."""
    return isinstance(exc, BentoMLException) and exc.error_code == 503


async def send_jobs(
    call: Callable[..., Awaitable[list[CaptionResult]]], jobs: list[CaptionJob], timeout_s: float, client: str = ""
) -> list[CaptionResult]:
    """`call(jobs)` for `client` (the model's fair queue shares by client), sent once more if it
    was lost on its connection; the model's queue drops the jobs after `timeout_s`, or when this
    call is cancelled. Raises Unavailable (503, Retry-After) when
    the queue is full or the model worker is being replaced; anything else is a server fault and
    propagates."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await call(jobs=jobs, timeout_s=timeout_s, client=client)
        except Exception as exc:
            if queue_full(exc):
                raise Unavailable("the server is at capacity; retry shortly") from None
            if not lost_on_its_connection(exc):
                raise
            if attempt == ATTEMPTS:
                # Lost twice: the model worker is gone, and BentoML's supervisor is starting a new one.
                raise Unavailable("the captioning model is restarting; retry shortly") from None
    raise AssertionError("unreachable")


async def model_service_ready(name: str, timeout_s: float) -> bool:
    """Does the model service (`name`: BlipModelService) answer its /readyz with 200 within
    `timeout_s`? Its address is a Unix socket (file://...) or an http:// URL (host/runner.py)."""
    address = service_address(name)
    if not address:
        return True  # no address (a test calling the app in-process): BentoML's own check decides
    if address.startswith("file://"):
        transport, url = httpx.AsyncHTTPTransport(uds=address.removeprefix("file://")), "http://model/readyz"
    else:
        transport, url = None, address.rstrip("/") + "/readyz"
    try:
        async with httpx.AsyncClient(transport=transport, timeout=timeout_s) as client:
            return (await client.get(url)).status_code == 200
    except httpx.HTTPError:
        return False
