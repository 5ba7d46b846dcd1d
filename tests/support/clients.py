"""The clients the tests share: aiohttp for concurrent requests, as users write it; httpx for one."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp
import httpx
from prometheus_client.parser import text_string_to_metric_families

from tools.metrics import parse_batch_histogram


@dataclass
class Answer:
    status: int
    retry_after: str | None
    body: dict


def upload_form(data: bytes, fields: dict | None = None) -> aiohttp.FormData:
    """A multipart body with the image as field `file`, and any other form `fields`."""
    form = aiohttp.FormData()
    form.add_field("file", data, filename="upload", content_type="application/octet-stream")
    for name, value in (fields or {}).items():
        form.add_field(name, value)
    return form


def post_concurrently(
    url: str, images: list[bytes], headers: dict | None = None, timeout_s: float = 120, fields: list[dict] | None = None
) -> list[Answer]:
    """POST every image to `url` (…/caption) at once, each as multipart field `file` (with the form
    `fields` of the same index, if given); answers in order."""

    async def send_all() -> list[Answer]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

            async def send(data: bytes, extra: dict) -> Answer:
                async with session.post(url, data=upload_form(data, extra), headers=headers or {}) as response:
                    return Answer(response.status, response.headers.get("Retry-After"), await response.json())

            return await asyncio.gather(
                *(send(data, extra) for data, extra in zip(images, fields or [{}] * len(images)))
            )

    return asyncio.run(send_all())


def closed_loop(url: str, image: bytes, clients: int, total: int, timeout_s: float = 600) -> Counter[int]:
    """`total` POSTs of `image` to `url` from `clients` clients in a closed loop (each sends its next
    request when its answer arrives); how many answers had each status."""

    async def run() -> Counter[int]:
        statuses: Counter[int] = Counter()
        remaining = iter(range(total))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

            async def client() -> None:
                for _ in remaining:
                    async with session.post(url, data=upload_form(image)) as response:
                        await response.read()
                        statuses[response.status] += 1

            await asyncio.gather(*(client() for _ in range(clients)))
        return statuses

    return asyncio.run(run())


def post_caption(server, files=None, data=None, **kwargs) -> httpx.Response:
    """One POST /caption with httpx, as a script would send it."""
    return httpx.post(f"{server.url}/caption", files=files, data=data, timeout=60, **kwargs)


def batch_histogram(server) -> dict[str, float]:
    """The server's batch-size histogram, from its /metrics."""
    return parse_batch_histogram(httpx.get(f"{server.url}/metrics").text)


def metric(server, sample_name: str, **labels: str) -> float:
    """The value of `sample_name` (e.g. blip_images_queued, blip_images_dropped_total) on the server's
    /metrics, summed over the samples whose labels include `labels`; 0 before it first appears."""
    families = text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=5).text)
    return sum(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == sample_name and labels.items() <= sample.labels.items()
    )


def queued_images(server) -> float:
    """Images waiting in the server's model queue now (its blip_images_queued gauge)."""
    return metric(server, "blip_images_queued")


def wait_for_queue(server, images: int, timeout_s: float = 30) -> None:
    """Return once at least `images` wait in the model's queue (or after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while queued_images(server) < images and time.monotonic() < deadline:
        time.sleep(0.02)


def multipart_head(length: int, path: str = "/caption") -> bytes:
    """Headers of an upload of `length` bytes to `path` and the start of its file part: what a
    slow or stalled client has sent when it stops."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Request-ID: trickle-1\r\nContent-Length: {length}\r\n"
        "Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n"
        '--b0undary\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
    ).encode()
