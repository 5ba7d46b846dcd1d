"""The model service's requests whose caller hung up: BentoML's API worker closes its connection to
the model worker when its own request is answered or abandoned, and the model worker stops waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.types import Receive

T = TypeVar("T")


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class CallerGone(Exception):
    """The caller closed its connection before the answer: nobody is waiting for it."""


async def until_disconnected(request: Request, call: Awaitable[T]) -> T:
    """Await `call`, cancelling it if the HTTP client of `request` (a Starlette request whose body
    was read) disconnects first: then raise CallerGone. The API service's call is cancelled, and so
    disconnects, when its own request is answered or abandoned."""
    work = asyncio.ensure_future(call)
    hang_up = asyncio.ensure_future(wait_for_disconnect(request.receive))  # the body was read: only a disconnect comes
    try:
        await asyncio.wait({work, hang_up}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        raise CallerGone()
    finally:
        hang_up.cancel()
        work.cancel()
