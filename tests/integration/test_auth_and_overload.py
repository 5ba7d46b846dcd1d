"""A server with an API key and a tight latency budget: 401s, and 503 + Retry-After under overload."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from support.clients import post_concurrently
from support.images import encode, scene
from tools.servers import bento_server

pytestmark = pytest.mark.slow  # starts the real server

KEY = "test-key-123"


@pytest.fixture(scope="module")
def guarded_server(tiny_model_dir, tmp_path_factory):
    env = {
        "BLIP_MODEL": tiny_model_dir,
        "BLIP_API_KEY": KEY,
        # Slow the model (always 100 tokens) and give the queue a small bound, so it overflows.
        "BLIP_MAX_NEW_TOKENS": "100",
        "BLIP_MIN_NEW_TOKENS": "100",
        "BLIP_MAX_FILES_PER_REQUEST": "4",
        "BLIP_MAX_QUEUED_IMAGES": "4",
        "BLIP_MAX_BATCH_SIZE": "2",
    }
    with bento_server(env, tmp_path_factory.mktemp("guarded") / "bentoml.log") as running:
        yield running


AUTH = {"Authorization": f"Bearer {KEY}"}
IMAGE = encode(scene(1), "PNG")


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}], ids=["none", "wrong", "no-bearer"]
)
def test_caption_without_the_key_is_401(guarded_server, headers):
    response = httpx.post(f"{guarded_server.url}/caption", files={"file": ("p.png", IMAGE)}, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"error": "missing or wrong API key: send 'Authorization: Bearer <key>'"}


def test_health_endpoints_stay_open(guarded_server):
    assert httpx.get(f"{guarded_server.url}/readyz").status_code == 200
    assert httpx.get(f"{guarded_server.url}/metrics").status_code == 200


def test_overload_answers_503_with_retry_after_and_loses_nothing(guarded_server):
    answers = post_concurrently(f"{guarded_server.url}/caption", [IMAGE] * 40, headers=AUTH)
    statuses = Counter(a.status for a in answers)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] >= 1 and statuses[503] >= 1, statuses
    for answer in answers:
        if answer.status == 503:
            assert answer.retry_after == "5"
            assert answer.body == {"error": "the server is at capacity; retry shortly"}
        else:
            assert set(answer.body) == {"caption"}
    assert httpx.get(f"{guarded_server.url}/readyz").status_code == 200
    response = httpx.post(f"{guarded_server.url}/caption", files={"file": ("p.png", IMAGE)}, headers=AUTH, timeout=60)
    assert response.status_code == 200


def test_the_openai_routes_take_the_key_as_the_sdk_sends_it(guarded_server):
    import base64

    import openai

    url = f"{guarded_server.url}/v1"
    data_url = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}}]}]
    keyed = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    [model] = keyed.models.list().data
    answer = keyed.chat.completions.create(model=model.id, messages=messages, max_tokens=100)
    assert answer.choices[0].message.content
    wrong = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
        wrong.chat.completions.create(model=model.id, messages=messages)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    refused = httpx.get(f"{url}/models")
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
