"""The channel between an API worker and the model service (blip_serve/shared/channel.py): the API's
end (api/model_channel.py) against the model's end (model/channel_server.py) served by a real uvicorn
on a Unix socket, as `bentoml serve` serves it; a stand-in for the batcher only. What crosses, what
each failure becomes, that cancelling a call, or closing the channel, reaches the model; and with
several model workers, each serving on its own socket, that each gets a channel and the calls are
spread over them."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile

import aiohttp
import numpy as np
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

from blip_serve.api.model_channel import ChannelClosed, ModelChannels
from blip_serve.api.model_client import lost_on_its_connection, send_jobs
from blip_serve.model.batcher import QueueFull
from blip_serve.model.channel_server import serve_channel, serve_worker_socket
from blip_serve.shared import channel
from blip_serve.shared.errors import Unavailable
from blip_serve.shared.jobs import CaptionJob, CaptionResult


class Batcher:
    """Captions each job with what it received; a prompt "hold" waits until released, "full" is
    refused, "fail" is a fault. Records the calls it saw and the ones cancelled."""

    def __init__(self):
        self.calls, self.cancelled, self.release = [], [], asyncio.Event()

    async def submit(self, jobs: list[CaptionJob], timeout_s: float, client=None) -> list[CaptionResult]:
        self.calls.append((jobs, timeout_s, client))
        prompt = jobs[0].prompt
        if prompt == "full":
            raise QueueFull("16 images queued")
        if prompt == "fail":
            raise ValueError("a broken batch")
        if prompt == "hold":
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.append(jobs)
                raise
        return [
            CaptionResult(
                caption=f"{job.prompt} {int(job.pixels.sum())} {job.pixels.shape} {len(job.jpeg)} {client}",
                new_tokens=job.max_new_tokens,
            )
            for job in jobs
        ]


def job(
    prompt: str | None = "a", seed: int = 0, shape=(3, 384, 384), jpeg: bytes = b"", tokens: int = 20
) -> CaptionJob:
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return CaptionJob(pixels=pixels, jpeg=jpeg, prompt=prompt, max_new_tokens=tokens)


async def cancelled(batcher: Batcher) -> list:
    """The calls the model saw cancelled, once there are any (within a second)."""
    for _ in range(100):
        if batcher.cancelled:
            break
        await asyncio.sleep(0.01)
    return batcher.cancelled


def expected(j: CaptionJob, client) -> str:
    return f"{j.prompt} {int(j.pixels.sum())} {j.pixels.shape} {len(j.jpeg)} {client}"


@contextlib.asynccontextmanager
async def model_service(batcher: Batcher, socket: str):
    """The model's end of the channel under uvicorn (its default WebSocket limits, as BentoML runs it)."""
    app = Starlette(routes=[WebSocketRoute(channel.PATH + "/", lambda ws: serve_channel(ws, batcher))])
    server = uvicorn.Server(uvicorn.Config(app, uds=socket, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        await task


def run(test) -> None:
    """`test(batcher, model)`: an API worker's channel `model` to a model service on a socket of its own."""

    async def main():
        with tempfile.TemporaryDirectory() as folder:
            batcher, socket = Batcher(), f"{folder}/model.sock"
            async with model_service(batcher, socket):
                model = ModelChannels([f"file://{socket}"])
                try:
                    await test(batcher, model)
                finally:
                    await model.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_call_crosses_with_its_pixels_jpeg_options_and_client():
    async def test(batcher, model):
        jobs = [job("a", 1), job(None, 2, shape=(3, 2, 5), jpeg=b"\xff\xd8jpeg"), job("b", 3, tokens=7)]
        results = await model.call(jobs, timeout_s=12.5, client="10.0.0.7")
        assert [r.caption for r in results] == [expected(j, "10.0.0.7") for j in jobs]
        assert [r.new_tokens for r in results] == [20, 20, 7]
        [(seen, timeout_s, client)] = batcher.calls
        assert timeout_s == 12.5 and client == "10.0.0.7"
        for sent, arrived in zip(jobs, seen):
            assert np.array_equal(sent.pixels, arrived.pixels) and arrived.jpeg == sent.jpeg
            assert arrived.generation_options() == sent.generation_options()
        # no client: the call is a flow of its own in the batcher (None), not a client named ""
        await model.call([job()], timeout_s=1, client="")
        assert batcher.calls[-1][2] is None

    run(test)


def test_a_call_larger_than_a_websocket_message_crosses_in_chunks():
    # 32 images' pixels and a 20 MB JPEG (BLIP_GPU_DECODE forwards files): past uvicorn's 16 MiB a message
    async def test(batcher, model):
        jobs = [job("a", seed) for seed in range(32)] + [job("a", 99, jpeg=bytes(range(256)) * 80_000)]
        header, chunks = channel.call_message(1, jobs, 1, "")
        assert sum(len(c) for c in chunks) > 16 * 1024 * 1024 and max(len(c) for c in chunks) <= channel.CHUNK
        results = await model.call(jobs, timeout_s=60, client="c")
        assert [r.caption for r in results] == [expected(j, "c") for j in jobs]
        assert batcher.calls[0][0][-1].jpeg == jobs[-1].jpeg

    run(test)


def test_calls_on_one_channel_are_answered_as_each_finishes():
    async def test(batcher, model):
        held = asyncio.create_task(model.call([job("hold")], timeout_s=60, client="a"))
        await asyncio.sleep(0.2)
        [quick] = await model.call([job("quick", 5)], timeout_s=60, client="b")
        assert quick.caption == expected(job("quick", 5), "b") and not held.done()
        batcher.release.set()
        [answer] = await held
        assert answer.caption == expected(job("hold"), "a")

    run(test)


def test_a_cancelled_call_leaves_the_model_and_others_go_on():
    async def test(batcher, model):
        held = asyncio.create_task(model.call([job("hold"), job("hold", 1)], timeout_s=60, client="a"))
        await asyncio.sleep(0.2)
        held.cancel()  # the API request ended (its client hung up)
        with pytest.raises(asyncio.CancelledError):
            await held
        assert [len(jobs) for jobs in await cancelled(batcher)] == [2]
        [result] = await model.call([job("next")], timeout_s=60, client="a")  # the channel still serves
        assert result.caption == expected(job("next"), "a")

    run(test)


def test_a_call_cancelled_while_it_is_sent_does_not_garble_the_channel():
    async def test(batcher, model):
        await model.call([job("first")], timeout_s=60, client="a")  # the channel is open
        big = [job("hold", seed) for seed in range(40)]  # ~18 MB: many messages
        sending = asyncio.create_task(model.call(big, timeout_s=60, client="a"))
        await asyncio.sleep(0)  # its first chunks are on their way
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        [result] = await model.call([job("next", 4)], timeout_s=60, client="b")
        assert result.caption == expected(job("next", 4), "b")
        assert [len(jobs) for jobs in await cancelled(batcher)] == [40]  # it arrived whole, and was cancelled

    run(test)


def test_a_full_queue_is_a_503_and_a_fault_in_the_model_an_error():
    async def test(batcher, model):
        with pytest.raises(Unavailable, match="at capacity"):
            await send_jobs(model.call, [job("full")], 60, "a")
        with pytest.raises(RuntimeError, match="ValueError: a broken batch"):
            await send_jobs(model.call, [job("fail")], 60, "a")
        [result] = await model.call([job("after")], timeout_s=60, client="a")
        assert result.caption == expected(job("after"), "a")

    run(test)


def test_a_channel_that_closes_loses_its_calls_and_the_next_call_opens_a_new_one():
    async def main():
        with tempfile.TemporaryDirectory() as folder:
            batcher, socket = Batcher(), f"{folder}/model.sock"
            model = ModelChannels([f"file://{socket}"])
            async with model_service(batcher, socket) as server:
                held = asyncio.create_task(model.call([job("hold")], timeout_s=60, client="a"))
                await asyncio.sleep(0.2)
                server.force_exit = True  # the model worker dies under the call
            with pytest.raises(ChannelClosed) as lost:
                await held
            assert lost_on_its_connection(lost.value)  # send_jobs sends it again
            with pytest.raises(aiohttp.ClientConnectionError) as refused:  # nobody serves the socket
                await model.call([job()], timeout_s=60, client="a")
            assert lost_on_its_connection(refused.value)  # lost again: then a 503
            with pytest.raises(Unavailable, match="restarting"):
                await send_jobs(model.call, [job()], 60, "a")
            async with model_service(Batcher(), socket):  # the worker is back, on the same socket
                [result] = await send_jobs(model.call, [job("back")], 60, "a")
                assert result.caption == expected(job("back"), "a")
            await model.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_an_api_worker_that_closes_its_channel_takes_its_calls_out_of_the_model():
    async def test(batcher, model):
        held = asyncio.create_task(model.call([job("hold")], timeout_s=60, client="a"))
        await asyncio.sleep(0.2)
        await model.close()
        with pytest.raises(ChannelClosed):
            await held
        assert len(await cancelled(batcher)) == 1

    run(test)


@contextlib.asynccontextmanager
async def model_workers(folder: str, count: int):
    """`count` model workers, each serving the channel on its own socket as `bentoml serve`'s do
    (channel_server.serve_worker_socket); yields their batchers and the API worker's ModelChannels."""
    batchers, runners = [Batcher() for _ in range(count)], []
    addresses = channel.worker_addresses(f"file://{folder}/model.sock", count)
    for worker, (batcher, address) in enumerate(zip(batchers, addresses), start=1):
        runners.append(await serve_worker_socket(address.removeprefix("file://"), batcher, worker))
    model = ModelChannels(addresses)
    try:
        yield batchers, model, runners
    finally:
        await model.close()
        for runner in runners:
            await runner.cleanup()


def test_each_model_worker_gets_a_channel_and_calls_go_to_the_least_busy():
    async def main():
        with tempfile.TemporaryDirectory() as folder:
            async with model_workers(folder, 2) as (batchers, model, _):
                held = [asyncio.create_task(model.call([job("hold", seed=i)], 60, "a")) for i in range(4)]
                await asyncio.sleep(0.3)
                assert [len(batcher.calls) for batcher in batchers] == [2, 2]
                large = job("big", shape=(3, 1024, 1024), jpeg=b"j" * (3 * channel.CHUNK))  # in chunks
                [done] = await model.call([large], 60, "a")
                assert done.caption == expected(large, "a")
                held[0].cancel()  # a cancel reaches its worker
                assert len(await cancelled(batchers[0])) == 1
                for batcher in batchers:
                    batcher.release.set()
                assert len(await asyncio.gather(*held[1:])) == 3

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_model_worker_being_replaced_is_passed_over_and_the_call_goes_to_another():
    async def main():
        with tempfile.TemporaryDirectory() as folder:
            async with model_workers(folder, 2) as (batchers, model, runners):
                await runners[0].cleanup()  # worker 1 is gone; its replacement is not serving yet
                for prompt in ("first", "second"):
                    [done] = await send_jobs(model.call, [job(prompt)], 60, "a")  # sent again once
                    assert done.caption == expected(job(prompt), "a")
                assert [len(batcher.calls) for batcher in batchers] == [0, 2]
                assert model.channels[0].failed_at > 0

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_call_lost_with_the_only_model_worker_waits_on_the_service_socket_for_its_replacement():
    """The worker's own socket is gone with it; the call goes to the service's shared socket, where
    the new worker answers once it serves (BentoML keeps that socket across a worker's replacement)."""

    async def main():
        with tempfile.TemporaryDirectory() as folder:
            batcher, shared = Batcher(), f"{folder}/model.sock"
            [worker] = channel.worker_addresses(f"file://{shared}", 1)
            model = ModelChannels([worker], shared=f"file://{shared}")
            async with model_service(batcher, shared):  # only the shared socket is served
                [done] = await send_jobs(model.call, [job("waited")], 60, "a")
            assert done.caption == expected(job("waited"), "a") and len(batcher.calls) == 1
            assert model.channels[0].failed_at > 0
            await model.close()

    asyncio.run(asyncio.wait_for(main(), 30))
