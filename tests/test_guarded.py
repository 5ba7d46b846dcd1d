"""A server with an API key and a tight latency budget: 401s, and 503 + Retry-After under overload."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import httpx
import pytest

from images import encode, scene
from load_test.servers import BentoServer

KEY = "test-key-123"


@pytest.fixture(scope="module")
def guarded_server(tiny_model_dir, tmp_path_factory):
    env = {
        "BLIP_MODEL": tiny_model_dir,
        "BLIP_API_KEY": KEY,
        # Slow the model (always 100 tokens) and give the queue a small budget, so it overflows.
        "BLIP_MAX_NEW_TOKENS": "100",
        "BLIP_MIN_NEW_TOKENS": "100",
        "BLIP_MAX_LATENCY_MS": "300",
        "BLIP_MAX_BATCH_SIZE": "2",
    }
    with BentoServer(env, tmp_path_factory.mktemp("guarded") / "bentoml.log") as running:
        yield running


AUTH = {"Authorization": f"Bearer {KEY}"}
IMAGE = encode(scene(1), "PNG")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}], ids=["none", "wrong", "no-bearer"])
def test_caption_without_the_key_is_401(guarded_server, headers):
    response = httpx.post(f"{guarded_server.url}/caption", files={"file": ("p.png", IMAGE)}, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"error": "missing or wrong API key: send 'Authorization: Bearer <key>'"}


def test_health_endpoints_stay_open(guarded_server):
    assert httpx.get(f"{guarded_server.url}/readyz").status_code == 200
    assert httpx.get(f"{guarded_server.url}/metrics").status_code == 200


def test_overload_answers_503_with_retry_after_and_loses_nothing(guarded_server):
    async def send_all(count: int):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

            async def send():
                form = aiohttp.FormData()
                form.add_field("file", IMAGE, filename="p.png")
                async with session.post(f"{guarded_server.url}/caption", data=form, headers=AUTH) as response:
                    return response.status, response.headers.get("Retry-After"), await response.json()

            return await asyncio.gather(*(send() for _ in range(count)))

    results = asyncio.run(send_all(40))
    statuses = Counter(status for status, _, _ in results)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] >= 1 and statuses[503] >= 1, statuses
    for status, retry_after, body in results:
        if status == 503:
            assert retry_after == "5"
            assert body == {"error": "the server is at capacity; retry shortly"}
        else:
            assert set(body) == {"caption"}
    assert httpx.get(f"{guarded_server.url}/readyz").status_code == 200
    response = httpx.post(f"{guarded_server.url}/caption", files={"file": ("p.png", IMAGE)}, headers=AUTH, timeout=60)
    assert response.status_code == 200
