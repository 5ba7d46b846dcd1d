"""A client library for a blip-serve server: BlipClient (blocking) and AsyncBlipClient (asyncio).
Needs httpx alone: no torch, no BentoML.

    from blip_serve.client.library import BlipClient
    client = BlipClient("http://127.0.0.1:3000")
    client.caption("dog.jpg")                       # one image: POST /caption
    client.caption_many(["a.jpg", "b.png"])          # many: POST /captions, a batch per request
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

RETRY_STATUSES = {502, 503, 504}
# The server's BLIP_REQUEST_TIMEOUT_S default (120 s) and 10 more, so that its own JSON 504 arrives
# first; nginx/ and k8s/ wait as long (tests/unit/shared/test_settings.py holds them all to settings.py).
TIMEOUT_S = 130.0


class BlipError(Exception):
    """The server refused a request (a 4xx), or it kept failing after every retry."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass
class Outcome:
    """One image's result from caption_many: a caption, or the error and status the server gave."""

    image: str
    caption: str | None = None
    error: str | None = None
    status: int = 200


ImageInput = str | os.PathLike | bytes


def read_image(image: ImageInput) -> tuple[str, bytes]:
    if isinstance(image, bytes):
        return "image", image
    path = Path(image)
    return path.name, path.read_bytes()


def option_fields(
    prompt: str | None = None, max_new_tokens: int | None = None, num_beams: int | None = None
) -> dict[str, str]:
    options = {"prompt": prompt, "max_new_tokens": max_new_tokens, "num_beams": num_beams}
    return {name: str(value) for name, value in options.items() if value is not None}


def retry_delay(headers: httpx.Headers | None, attempt: int, max_wait_s: float) -> float:
    """Retry-After when the server gave one, else exponential backoff with jitter; at most max_wait_s."""
    if headers is not None:
        try:
            return max(0.0, min(max_wait_s, float(headers.get("retry-after", ""))))
        except ValueError:
            pass
    return min(max_wait_s, 0.5 * 2**attempt * (0.5 + random.random()))


def error_message(body: bytes) -> str:
    """The server's {"error": ...}, or the start of whatever else it sent (an HTML page from a proxy)."""
    try:
        answer = json.loads(body)
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            return answer["error"][:1000]
    except ValueError:
        pass
    text = body[:300].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in text).strip() or "(an empty answer)"


# An answer for 1,024 images is well under 1 MB; anything larger is not a blip-serve answer.
MAX_ANSWER_BYTES = 8 * 1024 * 1024


class BadAnswer(Exception):
    """The server's answer cannot be trusted: too large, too slow, compressed, or not the shape
    blip-serve sends."""


class AsyncBlipClient:
    """Asynchronous client: `await client.caption(...)`, `await client.caption_many(...)`.

    Retries 502/503/504 answers and connection errors (honouring Retry-After) up to `retries`
    times; a 4xx is raised at once as BlipError with the server's message. It trusts nothing it
    is sent: a whole answer must arrive within `timeout_s` and hold at most MAX_ANSWER_BYTES, is
    never decompressed, and must have blip-serve's shape; otherwise BlipError with status 0."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:3000",
        api_key: str | None = None,
        timeout_s: float = TIMEOUT_S,
        retries: int = 6,
        max_retry_wait_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        headers = {"Accept-Encoding": "identity"}  # no decompression bombs
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport)
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_retry_wait_s = max_retry_wait_s

    async def __aenter__(self) -> AsyncBlipClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    async def fetch(self, method: str, path: str, timeout_s: float | None = None, **request) -> tuple[int, dict, bytes]:
        """(status, headers, body) of one request, the whole answer within `timeout_s` (a server
        that sends a byte now and then does not reset it) and at most MAX_ANSWER_BYTES."""
        try:
            async with asyncio.timeout(timeout_s or self.timeout_s):
                async with self.http.stream(method, path, **request) as response:
                    if response.headers.get("content-encoding", "identity").lower() != "identity":
                        raise BadAnswer("the server sent a compressed answer, which was not asked for")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():  # not decoded: refused above
                        body += chunk
                        if len(body) > MAX_ANSWER_BYTES:
                            raise BadAnswer(f"the server's answer is over {MAX_ANSWER_BYTES >> 20} MB")
                    return response.status_code, response.headers, bytes(body)
        except TimeoutError:
            raise BadAnswer(f"no complete answer within {timeout_s or self.timeout_s:g} s") from None

    async def post(self, path: str, files: list, data: dict) -> dict:
        for attempt in range(self.retries + 1):
            headers = None
            try:
                status, headers, body = await self.fetch("POST", path, files=files, data=data)
            except BadAnswer as exc:
                raise BlipError(0, str(exc)) from None
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise BlipError(0, f"no answer from the server: {exc!r}") from None
            else:
                if status == 200:
                    try:
                        answer = json.loads(body)
                    except ValueError:
                        answer = None
                    if not isinstance(answer, dict):
                        raise BlipError(0, f"the server's answer is not blip-serve's JSON: {error_message(body)}")
                    return answer
                if status not in RETRY_STATUSES or attempt == self.retries:
                    raise BlipError(status, error_message(body))
            await asyncio.sleep(retry_delay(headers, attempt, self.max_retry_wait_s))
        raise AssertionError("unreachable")

    async def caption(
        self,
        image: ImageInput,
        prompt: str | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
    ) -> str:
        name, data = read_image(image)
        answer = await self.post("/caption", [("file", (name, data))], option_fields(prompt, max_new_tokens, num_beams))
        if not isinstance(answer.get("caption"), str):
            raise BlipError(0, 'the server\'s answer has no "caption" string')
        return answer["caption"]

    async def caption_batch(self, images: list[ImageInput], **options) -> list[Outcome]:
        """One POST /captions for `images`; an outcome per image, in order. An image the answer
        does not account for (a short list, an entry of the wrong shape) is an error of its own."""
        files = [("file", read_image(image)) for image in images]
        answer = await self.post("/captions", files, option_fields(**options))
        entries = answer.get("captions")
        if not isinstance(entries, list):
            raise BlipError(0, 'the server\'s answer has no "captions" list')
        outcomes = []
        for index, image in enumerate(images):
            name = f"#{index}" if isinstance(image, bytes) else str(image)
            entry = entries[index] if index < len(entries) else None
            outcomes.append(outcome_of(name, entry))
        return outcomes

    async def caption_many(
        self, images: Iterable[ImageInput], concurrency: int = 4, batch: int = 8, **options
    ) -> list[Outcome]:
        """Every image, `batch` per request and `concurrency` requests in flight; outcomes in order."""
        batches = list(chunks(list(images), batch))
        slots = asyncio.Semaphore(concurrency)

        async def one(group: list[ImageInput]) -> list[Outcome]:
            async with slots:
                return await self.caption_batch(group, **options)

        return [outcome for group in await asyncio.gather(*(one(g) for g in batches)) for outcome in group]


def outcome_of(name: str, entry) -> Outcome:
    """One image's entry of a /captions answer, checked: a caption string, or an error and a status."""
    if entry is None:
        return Outcome(name, error="the server's answer has no result for this image", status=0)
    if isinstance(entry, dict) and isinstance(entry.get("caption"), str):
        return Outcome(name, entry["caption"])
    if isinstance(entry, dict) and isinstance(entry.get("error"), str) and isinstance(entry.get("status"), int):
        return Outcome(name, error=entry["error"][:1000], status=entry["status"])
    return Outcome(name, error="the server's result for this image is not blip-serve's shape", status=0)


class BlipClient:
    """Synchronous client with the same methods as AsyncBlipClient."""

    def __init__(self, url: str = "http://127.0.0.1:3000", **settings):
        self.url, self.settings = url, settings

    def run(self, method: str, *args, **kwargs):
        async def call():
            async with AsyncBlipClient(self.url, **self.settings) as client:
                return await getattr(client, method)(*args, **kwargs)

        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop here: the usual case
            return asyncio.run(call())
        # Called from inside a running loop (a Jupyter cell): run on a loop of its own, in a thread.
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            return thread.submit(asyncio.run, call()).result()

    def caption(self, image: ImageInput, **options) -> str:
        return self.run("caption", image, **options)

    def caption_many(
        self, images: Iterable[ImageInput], concurrency: int = 4, batch: int = 8, **options
    ) -> list[Outcome]:
        return self.run("caption_many", list(images), concurrency=concurrency, batch=batch, **options)


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# The command-line tool
