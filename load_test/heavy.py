"""Does one heavy client starve ordinary ones? p95 of ordinary /caption requests alone, then again
while one client keeps sending the heaviest /captions the limits allow (32 images, 4 beams, 100 tokens).

    python -m load_test.heavy http://127.0.0.1:3000 --concurrency 4 --requests 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import aiohttp

from load_test.load_generator import run_step
from tools.sample_images import load_images


async def heavy_client(base_url: str, images, stop: asyncio.Event, answers: list[int]) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        while not stop.is_set():
            form = aiohttp.FormData()
            for k in range(32):
                name, data = images[k % len(images)]
                form.add_field("file", data, filename=f"{k}-{name}")
            form.add_field("num_beams", "4")
            form.add_field("max_new_tokens", "100")
            async with session.post(f"{base_url}/captions", data=form) as response:
                answers.append(response.status)
                await response.read()


async def main(args) -> None:
    images = load_images(None, size=(640, 480))
    url = f"{args.base_url}/caption"
    alone = await run_step("ordinary alone", url, images, "closed", args.concurrency, args.requests, 8)
    stop, answers = asyncio.Event(), []
    heavy = asyncio.create_task(heavy_client(args.base_url, images, stop, answers))
    await asyncio.sleep(args.head_start_s)  # the heavy request is queued and running first
    shared = await run_step("ordinary beside heavy", url, images, "closed", args.concurrency, args.requests, 0)
    stop.set()
    heavy.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await heavy
    for step in (alone, shared):
        print(f"{step.server}: {step.throughput} img/s, p50 {step.p50_s} s, p95 {step.p95_s} s, {step.statuses}")
    print(f"p95 beside the heavy client / alone: {shared.p95_s / alone.p95_s:.2f}x; heavy answers: {answers}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base_url", help="the server, e.g. http://127.0.0.1:3000")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--head-start-s", type=float, default=2.0)
    asyncio.run(main(parser.parse_args()))
