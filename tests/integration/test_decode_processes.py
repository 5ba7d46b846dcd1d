"""blip_serve/decoding/'s processes, real ones, without a server. Same pixels as decoding
in-process; the CPU and memory budgets hold; a cancelled request's decode is killed; requests
take turns; a small image never waits behind a large one; a grown process is replaced; the
costliest accepted uploads stay within their memory figure."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import psutil
import pytest
from PIL import Image

from blip_serve.decoding.images import ImageLimits, ResizeSpec, prepare_image
from blip_serve.decoding.pool import Decoders
from blip_serve.shared.errors import ClientError
from support import hostile
from support.decoders import CONFIG, config
from support.images import encode, scene, upload_corpus
from tools.servers import REPO

pytestmark = pytest.mark.slow  # real decode processes, large images

OPEN: list[Decoders] = []


def run(coroutine):
    """Run a test's coroutine, then stop the processes it started (on the same loop)."""

    async def and_close():
        try:
            return await coroutine
        finally:
            await asyncio.gather(*(decoders.close() for decoders in OPEN))
            OPEN.clear()

    return asyncio.run(and_close())


async def started(small: int = 1, large: int = 1, **changes) -> Decoders:
    decoders = Decoders(config(**changes), small, large)
    OPEN.append(decoders)
    await decoders.warm_up()
    return decoders


def pids(decoders: Decoders) -> set[int]:
    pools = (decoders.small, decoders.large)
    return {p.process.pid for pool in pools for p in pool.idle if p.process and p.process.returncode is None}


def heavy_rgba_png() -> bytes:
    """40 MP with an alpha channel: ~1.5 s of a 2-core Xeon's core to inflate, composite and resize."""
    return hostile.flat_png("RGBA", 6_324)


def test_pixels_equal_an_in_process_decode():
    async def go():
        decoders = await started()
        return {name: await decoders.prepare(data, owner=1) for name, data in upload_corpus().items()}

    for name, prepared in run(go()).items():
        expected = prepare_image(upload_corpus()[name], ImageLimits(), ResizeSpec())
        assert np.array_equal(prepared.pixels, expected.pixels), name
        assert (prepared.width, prepared.height) == (expected.width, expected.height)


def test_client_errors_come_back_with_their_status_and_message():
    async def go():
        decoders = await started()
        answers = []
        for data in (b"not an image", hostile.arithmetic_jpeg(), encode(Image.new("L", (12_000, 10_000)), "PNG")):
            with pytest.raises(ClientError) as caught:
                await decoders.prepare(data, owner=1)
            answers.append((caught.value.status_code, caught.value.message))
        return answers

    (s1, m1), (s2, m2), (s3, m3) = run(go())
    assert s1 == 415 and "not a supported image" in m1
    assert s2 == 415 and "arithmetic-coded" in m2
    assert s3 == 413 and "12000x10000 pixels" in m3


def test_the_cpu_budget_ends_a_decode_and_the_pool_goes_on():
    async def go():
        decoders = await started(cpu_s=0.2)
        before = pids(decoders)
        begun = time.perf_counter()
        with pytest.raises(ClientError) as caught:
            await decoders.prepare(heavy_rgba_png(), owner=1)
        took = time.perf_counter() - begun
        after = await decoders.prepare(encode(scene(1), "JPEG"), owner=2)
        return caught.value, took, before, pids(decoders), after

    error, took, before, after_pids, prepared = run(go())
    assert error.status_code == 413 and "more CPU time than the server allows for its size" in error.message
    assert "(0.2 s for 40 MP" in error.message
    assert took < 5, "the budget ends the decode, not the whole inflate and composite"
    assert before != after_pids, "the process that ran out of budget was replaced"
    assert prepared.pixels.shape == (3, 384, 384)


def test_the_memory_budget_refuses_what_would_take_more():
    async def go():
        decoders = await started(memory_mb=100)
        with pytest.raises(ClientError) as caught:
            await decoders.prepare(hostile.flat_png("RGB", 6_324), owner=1)  # 120 MB of pixels
        small = await decoders.prepare(encode(scene(2), "PNG"), owner=1)
        return caught.value, small

    error, small = run(go())
    assert error.status_code == 413 and "too large to decode" in error.message
    assert small.pixels.shape == (3, 384, 384)


def test_a_cancelled_request_kills_its_decode_at_once():
    async def go():
        decoders = await started()
        [busy] = decoders.large.idle
        await busy.ready()
        task = asyncio.create_task(decoders.prepare(heavy_rgba_png(), owner=1))
        await asyncio.sleep(0.4)  # the header read, the hand-over to the large pool, the decode begun
        child = psutil.Process(busy.process.pid)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gone = await asyncio.to_thread(psutil.wait_procs, [child], 2)
        again = await decoders.prepare(heavy_rgba_png(), owner=2)
        return gone, again

    (gone, alive), again = run(go())
    assert len(gone) == 1 and not alive, "the child decoding for a cancelled request still runs"
    assert again.width == 6_324


def test_requests_take_turns_for_the_processes():
    """One process; request A queues eight images, then B one: B is served second, not ninth."""
    images = [encode(scene(40 + i, (1600, 1200)), "PNG") for i in range(8)]
    finished: list[str] = []

    async def go():
        decoders = await started(small=1)

        async def decode(owner: int, data: bytes, label: str):
            await decoders.prepare(data, owner)
            finished.append(label)

        a = [asyncio.create_task(decode(1, data, f"a{i}")) for i, data in enumerate(images)]
        await asyncio.sleep(0)
        b = asyncio.create_task(decode(2, images[0], "b"))
        await asyncio.gather(*a, b)

    run(go())
    assert finished.index("b") <= 1, finished


def test_a_small_image_never_waits_behind_a_large_one():
    async def go():
        decoders = await started()
        large = asyncio.create_task(decoders.prepare(heavy_rgba_png(), owner=1))
        await asyncio.sleep(0.3)
        begun = time.perf_counter()
        await decoders.prepare(encode(scene(3), "JPEG"), owner=2)
        small_took = time.perf_counter() - begun
        await large
        return small_took, large.done()

    small_took, _ = run(go())
    assert small_took < 0.5, f"a small image waited {small_took:.2f} s"


def test_a_process_that_grew_is_replaced_so_memory_goes_back():
    async def go():
        decoders = await started()
        [process] = decoders.large.idle
        await process.ready()
        fresh = psutil.Process(process.process.pid).memory_info().rss
        await decoders.prepare(hostile.flat_png("RGB", 6_324), owner=1)
        [after] = decoders.large.idle
        await after.ready()
        return fresh, psutil.Process(after.process.pid).memory_info().rss

    fresh, after = run(go())
    assert after < fresh + 64 * 1024 * 1024


def test_decode_processes_exit_with_their_parent():
    code = (
        "import asyncio, os, sys\n"
        "from blip_serve.decoding.pool import DecodeConfig, Decoders\n"
        "async def main():\n"
        f"    d = Decoders(DecodeConfig(**{CONFIG.__dict__!r}), 2, 1)\n"
        "    await d.warm_up()\n"
        "    print(*[p.process.pid for p in d.small.idle + d.large.idle], flush=True)\n"
        "    os._exit(0)\n"
        "asyncio.run(main())\n"
    )
    import subprocess
    import sys

    root = str(REPO)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60).stdout
    children = [int(pid) for pid in out.split()]
    assert len(children) == 3
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(psutil.pid_exists(pid) for pid in children):
        time.sleep(0.05)
    assert not [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


# The costliest uploads that are accepted (README, Limits and errors): peak resident memory of a
# fresh decode process, above its own size, stays under the figure the README gives.
COSTLY = {
    "40 MP 16-bit grey PNG": (lambda: hostile.flat_png("I;16", 6_324), 400),
    "40 MP RGBA PNG": (lambda: hostile.flat_png("RGBA", 6_324), 400),
    "40 MP progressive JPEG": (
        lambda: encode(Image.new("RGB", (6_324, 6_324), (90, 120, 150)), "JPEG", quality=95, progressive=True),
        400,
    ),
    "36 MP WebP": (lambda: encode(scene(2, (6_000, 6_000)), "WEBP", quality=90), 700),
}


@pytest.mark.parametrize("name", COSTLY)
def test_the_costliest_accepted_uploads_stay_within_their_memory_figure(name):
    build, megabytes = COSTLY[name]

    async def go():
        decoders = await started()
        [process] = decoders.large.idle
        await process.ready()
        fresh = psutil.Process(process.process.pid).memory_info().rss
        header, _ = await decoders.large.decode(build(), owner=1, large_ok=True)
        return header, fresh

    header, fresh = run(go())
    assert "width" in header, header
    grew = (header["peak"] - fresh) >> 20
    print(f"{name}: +{grew} MB at the decode's peak")
    assert grew < megabytes


def test_a_process_killed_from_outside_is_the_servers_fault_not_the_images():
    """Before: the next upload went to the dead process and got a 415 ("could not be decoded").
    Now it is tried on a new process; killed again from outside, it is a 503 to retry."""
    import os
    import signal

    from blip_serve.shared.errors import Unavailable

    async def go():
        decoders = await started()
        for pid in pids(decoders):
            os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.2)
        prepared = await decoders.prepare(encode(scene(3), "JPEG"), owner=1)

        [child] = decoders.small.idle
        real_decode = child.decode.__func__

        async def killed_on_arrival(process, data, large_ok):  # every process dies as the image arrives
            await process.ready()
            os.kill(process.process.pid, signal.SIGKILL)
            await process.process.wait()
            return await real_decode(process, data, large_ok)

        from blip_serve.decoding.pool import DecodeProcess

        DecodeProcess.decode = killed_on_arrival
        try:
            with pytest.raises(Unavailable) as caught:
                await decoders.prepare(encode(scene(4), "JPEG"), owner=2)
        finally:
            DecodeProcess.decode = real_decode
        return prepared, caught.value

    prepared, error = run(go())
    assert prepared.pixels.shape == (3, 384, 384)
    assert error.status_code == 503 and "stopped from outside; retry shortly" in error.message
