"""blip_serve/decoding/'s rules without starting a decode process: the CPU budget for an
image's size, and a process that cannot start is the server's fault (503), not the upload's."""

from __future__ import annotations

import asyncio

import pytest

from blip_serve.decoding.pool import Decoders
from support.decoders import CONFIG, config
from support.images import encode, scene


def test_the_cpu_budget_grows_with_the_pixels_from_one_second():
    budget = config(cpu_s=10.0).cpu_budget
    assert budget(40_000_000) == 10.0 and budget(12_000_000) == 3.0
    assert budget(4_000_000) == 1.0 and budget(100) == 1.0  # a small image that decodes slowly: 1 s
    assert config(cpu_s=0.2).cpu_budget(100) == 0.2


def test_a_decode_process_that_cannot_start_is_a_503_not_the_uploads_fault(monkeypatch):
    from blip_serve.decoding import pool as decode_workers
    from blip_serve.shared.errors import Unavailable

    monkeypatch.setattr(decode_workers.sys, "executable", "/bin/false")

    async def go():
        decoders = Decoders(CONFIG, 1, 1)
        try:
            with pytest.raises(Unavailable, match="could not start an image decoder") as caught:
                await decoders.prepare(encode(scene(1), "JPEG"), owner=1)
        finally:
            await decoders.close()
        return caught.value

    error = asyncio.run(go())
    assert error.status_code == 503 and error.headers == {"Retry-After": "5"}


def test_a_waiter_that_hung_up_never_costs_the_pool_its_process():
    """Before: give_back handed the process to a waiter whose request had just been cancelled
    (its turn already cancelled, its clean-up not yet run): InvalidStateError, and the process was
    lost for good, one per hung-up upload, until every upload of that size waited for its 504."""
    from blip_serve.decoding.pool import DecodePool

    async def go():
        pool = DecodePool(1, CONFIG)  # processes start on first decode: none start here
        held = await pool.take(owner=1)
        waiter = asyncio.ensure_future(pool.take(owner=2))
        await asyncio.sleep(0)  # queued behind owner 1
        waiter.cancel()  # its turn is cancelled now; its clean-up runs on the next loop pass
        pool.give_back(held, owner=1)
        with pytest.raises(asyncio.CancelledError):
            await waiter
        after = await asyncio.wait_for(pool.take(owner=3), 1)
        return held, after, pool

    held, after, pool = asyncio.run(go())
    assert after is held and pool.waiting == [] and pool.idle == []


def test_the_pools_follow_the_settings():
    import os

    from blip_serve.decoding.images import ResizeSpec
    from blip_serve.shared.settings import Settings

    settings = Settings(decode_processes=3, max_concurrent_decodes=0, decode_memory_mb=300, max_image_side=5000)
    decoders = Decoders.for_settings(settings, ResizeSpec(width=224, height=160))
    cores = len(os.sched_getaffinity(0))
    assert (len(decoders.small.idle), len(decoders.large.idle)) == (3, max(1, cores // 2))
    small, large = decoders.small.config, decoders.large.config
    assert (small.width, small.height, small.memory_mb, small.max_side) == (224, 160, 300, 5000)
    assert not small.idle_priority and large.idle_priority  # large images yield the cores
