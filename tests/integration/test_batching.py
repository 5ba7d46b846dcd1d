"""The batching policy against the real `bentoml serve`: a client that hangs up never reaches the
model, a burst leaves nothing behind, and overload is answered 503 + Retry-After at once."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter

import aiohttp
import httpx
import pytest

from support.clients import batch_histogram, metric, post_concurrently
from support.images import encode, scene
from tools.servers import bento_server

pytestmark = pytest.mark.slow
IMAGE = encode(scene(3), "PNG")


@pytest.fixture(scope="module")
def slow_server(tiny_model_dir, tmp_path_factory):
    """One image a batch, 100 tokens each: a queue forms behind a few requests."""
    env = {
        "BLIP_MODEL": tiny_model_dir,
        "BLIP_PRECISION": "fp32",
        "BLIP_MAX_BATCH_SIZE": "1",
        "BLIP_MAX_NEW_TOKENS": "100",
        "BLIP_MIN_NEW_TOKENS": "100",
        "BLIP_MAX_READING_BYTES": str(2 * 1024 * 1024),
    }
    with bento_server(env, tmp_path_factory.mktemp("batching") / "bentoml.log") as running:
        yield running


def dropped(server, reason: str) -> float:
    return metric(server, "blip_images_dropped_total", reason=reason)


def upload(image: bytes, path: str = "/caption") -> bytes:
    body = (
        b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        + image
        + b"\r\n--b0undary--\r\n"
    )
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        "Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n"
    ).encode() + body


def test_a_client_that_hangs_up_never_reaches_the_model(slow_server):
    before_batches = batch_histogram(slow_server).get("count", 0)
    before_dropped = dropped(slow_server, "cancelled")

    async def scenario() -> list[int]:
        async with aiohttp.ClientSession() as session:

            async def caption() -> int:
                form = aiohttp.FormData()
                form.add_field("file", IMAGE, filename="a.png")
                async with session.post(f"{slow_server.url}/caption", data=form) as response:
                    return response.status

            blockers = [asyncio.create_task(caption()) for _ in range(10)]
            await asyncio.sleep(0.1)  # ten queued or running, ~0.15 s each
            host, port = slow_server.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port))) as quitter:
                quitter.sendall(upload(IMAGE))
                await asyncio.sleep(0.2)  # decoded and queued behind the ten, then gone
            return await asyncio.gather(*blockers)

    assert asyncio.run(scenario()) == [200] * 10
    deadline = time.monotonic() + 10
    while dropped(slow_server, "cancelled") == before_dropped and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dropped(slow_server, "cancelled") - before_dropped == 1
    assert batch_histogram(slow_server)["count"] - before_batches == 10  # the quitter's image never ran
    log = slow_server.log_text()
    assert "status=499" in log  # closed as nginx would log it; the request is over for every layer
    in_progress = [
        line
        for line in httpx.get(f"{slow_server.url}/metrics").text.splitlines()
        if line.startswith("bentoml_service_request_in_progress") and '"/caption"' in line
    ]
    assert in_progress and all(line.endswith(" 0.0") for line in in_progress), in_progress


def test_overload_is_503_with_retry_after_at_once_never_408(slow_server):
    """Ten 1 MB uploads at once against a 2 MB reading budget: the server refuses what it cannot
    read now instead of reading everything slowly and blaming the clients."""
    big = encode(scene(11, (700, 700)), "BMP")  # ~1.4 MB
    answers = post_concurrently(f"{slow_server.url}/caption", [big] * 10)
    statuses = Counter(a.status for a in answers)
    assert set(statuses) <= {200, 503} and statuses[503] >= 1, statuses
    for answer in answers:
        if answer.status == 503:
            assert answer.retry_after is not None
            assert answer.body["error"].endswith("retry shortly")


def test_a_lone_request_after_a_burst_is_as_fast_as_before(server):
    """A burst that overflows the queue (BentoML's batcher then held lone requests ~40 s for hours)."""

    def lone_caption_s() -> float:
        started = time.perf_counter()
        response = httpx.post(f"{server.url}/caption", files={"file": ("a.png", IMAGE)}, timeout=60)
        assert response.status_code == 200
        return time.perf_counter() - started

    before = min(lone_caption_s() for _ in range(3))

    async def burst() -> Counter:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

            async def captions() -> int:
                form = aiohttp.FormData()
                for k in range(32):
                    form.add_field("file", IMAGE, filename=f"{k}.png")
                async with session.post(f"{server.url}/captions", data=form) as response:
                    return response.status

            return Counter(await asyncio.gather(*(captions() for _ in range(40))))

    statuses = asyncio.run(burst())
    assert set(statuses) <= {200, 503} and statuses[503] >= 1, statuses
    after = min(lone_caption_s() for _ in range(3))
    print(f"lone /caption: {before:.3f} s before the burst ({dict(statuses)}), {after:.3f} s after")
    assert after < 2.0 and after <= max(5 * before, 0.5), (before, after)


MIXED_PROMPTS = [None, "a picture of", "a photo of a", "the"]


def test_captions_with_their_own_prompts_and_lengths_share_steps_and_equal_generate_alone(server, reference):
    """Twelve clients, each its own prompt and max_new_tokens, at once: they share decoder steps
    (a batch could not mix them), and each caption is transformers' generate for that image alone."""
    images = [encode(scene(1200 + i), "PNG") for i in range(12)]
    fields = [
        {"max_new_tokens": str(6 + 3 * i), **({"prompt": MIXED_PROMPTS[i % 4]} if MIXED_PROMPTS[i % 4] else {})}
        for i in range(12)
    ]
    steps_before = metric(server, "blip_step_captions_count")
    captions_before = metric(server, "blip_step_captions_sum")
    answers = post_concurrently(f"{server.url}/caption", images, fields=fields)
    steps = metric(server, "blip_step_captions_count") - steps_before
    captions_per_step = (metric(server, "blip_step_captions_sum") - captions_before) / steps

    assert [a.status for a in answers] == [200] * 12
    expected = [
        reference.caption(data, prompt=MIXED_PROMPTS[i % 4], max_new_tokens=6 + 3 * i) for i, data in enumerate(images)
    ]
    assert [a.body["caption"] for a in answers] == expected
    assert captions_per_step > 1.5, captions_per_step


def test_clients_are_known_by_address_and_a_forwarded_one_only_from_a_trusted_proxy(server):
    """The fair queue's clients: a request from 127.0.0.1 (uvicorn's default FORWARDED_ALLOW_IPS,
    where nginx would be) counts as the address it forwards; from anywhere else, as its own address,
    whatever it forwards."""
    image = {"file": ("a.png", IMAGE)}
    proxied = httpx.post(f"{server.url}/caption", files=image, headers={"X-Forwarded-For": "203.0.113.7"})
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as elsewhere:
        spoofed = elsewhere.post(f"{server.url}/caption", files=image, headers={"X-Forwarded-For": "203.0.113.8"})
    assert proxied.status_code == spoofed.status_code == 200
    # Each line is written as its request ends, just after the answer's last byte: wait for them.
    deadline = time.monotonic() + 5
    while (
        not {"client=203.0.113.7", "client=127.0.0.2"} <= set(server.log_text().split()) and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    log = server.log_text()
    assert "client=203.0.113.7" in log
    assert "client=127.0.0.2" in log and "203.0.113.8" not in log
