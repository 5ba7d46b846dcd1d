"""blip_serve/api/model_client.py: which failed calls to the model service are sent again, and what
the client gets for the rest."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
from bentoml.exceptions import BentoMLException

from blip_serve.api.model_client import lost_on_its_connection, queue_full, send_jobs
from blip_serve.shared.errors import Unavailable
from blip_serve.shared.jobs import CaptionJob, CaptionResult

PIXELS = np.zeros((3, 4, 4), np.uint8)


def job(prompt=None, tokens=30, beams=1) -> CaptionJob:
    return CaptionJob(pixels=PIXELS, prompt=prompt, max_new_tokens=tokens, num_beams=beams)


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

    async def call(jobs, timeout_s, client):
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
