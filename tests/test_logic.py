"""Pure logic in-process, no server: job grouping, the retry decision for model calls, which paths
count as routes for metrics, and the token bound."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from blip_serve.errors import BadRequest, Unavailable
from blip_serve.jobs import CaptionJob, CaptionResult, group_jobs
from blip_serve.model_client import lost_on_its_connection, queue_full, send_jobs
from blip_serve.server_patches import has_route
from blip_serve.text_limits import TextLimits

PIXELS = np.zeros((3, 4, 4), np.uint8)


def job(prompt=None, tokens=30, beams=1) -> CaptionJob:
    return CaptionJob(pixels=PIXELS, prompt=prompt, max_new_tokens=tokens, num_beams=beams)


def test_jobs_with_the_same_options_share_a_group_in_arrival_order():
    jobs = [job(), job("a photo of"), job(), job(tokens=5), job("a photo of"), job(beams=2)]
    assert group_jobs(jobs) == [[0, 2], [1, 4], [3], [5]]


def test_lost_connections_are_retried_and_nothing_else():
    assert lost_on_its_connection(aiohttp.ServerDisconnectedError())
    assert lost_on_its_connection(aiohttp.ClientConnectorError(None, OSError(111, "refused")))
    assert lost_on_its_connection(RuntimeError("Session is closed"))
    assert lost_on_its_connection(aiohttp.ClientPayloadError("Response payload is not completed"))  # died mid-answer
    assert not lost_on_its_connection(RuntimeError("CUDA out of memory"))
    assert not lost_on_its_connection(ValueError("bad"))
    assert queue_full(BentoMLException("full", error_code=503))
    assert not queue_full(BentoMLException("bad", error_code=500))


def run_send_jobs(failures: list[Exception]) -> tuple[list | Exception, int]:
    """send_jobs with a call that raises each of `failures` in turn, then answers."""
    calls = 0

    async def call(jobs, timeout_s):
        nonlocal calls
        calls += 1
        if failures:
            raise failures.pop(0)
        return [CaptionResult(caption="ok")]

    try:
        return asyncio.run(send_jobs(call, [job()], timeout_s=120)), calls
    except Exception as exc:
        return exc, calls


def test_a_call_lost_once_is_sent_once_more():
    results, calls = run_send_jobs([aiohttp.ServerDisconnectedError()])
    assert calls == 2 and results[0].caption == "ok"


def test_a_call_lost_twice_is_a_503():
    error, calls = run_send_jobs([aiohttp.ServerDisconnectedError(), RuntimeError("Session is closed")])
    assert calls == 2 and isinstance(error, Unavailable) and "restarting" in error.message


def test_a_full_queue_is_a_503_at_once_and_other_errors_propagate():
    error, calls = run_send_jobs([BentoMLException("full", error_code=503)])
    assert calls == 1 and isinstance(error, Unavailable) and "capacity" in error.message
    error, calls = run_send_jobs([KeyError("bug")])
    assert calls == 1 and isinstance(error, KeyError)


def routes_app() -> Starlette:
    api = FastAPI()
    api.post("/caption")(lambda: None)
    return Starlette(routes=[Route("/readyz", lambda r: None), Mount("/static", routes=[]), Mount("/", api)])


@pytest.mark.parametrize(
    "path, known",
    [
        ("/readyz", True),
        ("/caption", True),
        ("/nope", False),
        ("/caption/x", False),
        ("/static/a.js", False),
        ("/", False),
    ],
)
def test_only_paths_with_a_route_get_metric_labels(path, known):
    assert has_route(routes_app(), {"type": "http", "path": path, "method": "GET", "root_path": ""}) is known


@pytest.fixture(scope="module")
def text_limits(tiny_model_dir) -> TextLimits:
    return TextLimits.for_model(tiny_model_dir, max_new_tokens_limit=1000)


def test_the_token_limit_is_clamped_to_the_models_positions(text_limits):
    assert text_limits.positions == 128
    assert text_limits.max_new_tokens_limit == 127


def test_prompt_tokens_plus_new_tokens_must_fit(text_limits):
    start = text_limits.start_length("dog " * 20)
    assert start == 21  # [DEC] + 20 words: the tokenizer's [CLS] becomes [DEC], its [SEP] is dropped
    text_limits.check("dog " * 20, 128 - start)
    with pytest.raises(BadRequest, match="the prompt is 20 tokens and max_new_tokens is 108: together they need 129"):
        text_limits.check("dog " * 20, 129 - start)
    with pytest.raises(BadRequest, match="the most this server allows is 127"):
        text_limits.check(None, 128)
