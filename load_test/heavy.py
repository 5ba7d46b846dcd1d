"""Does one client starve others? p95 of ordinary /caption requests alone, then again beside either

- a heavy client that keeps sending the heaviest /captions (32 images, 100 tokens each; --beams 4
  for beam search), or
- a crowd: one client with --crowd N connections, each sending single /caption requests.

Each client sends from its own loopback address (127.0.0.2, .3), as separate machines would: the
server shares its model by client address.

    python -m load_test.heavy http://127.0.0.1:3000 --concurrency 4 --requests 32
    python -m load_test.heavy http://127.0.0.1:3000 --concurrency 1 --requests 16 --crowd 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import aiohttp

from load_test.load_generator import client_connector, closed_loop, run_step
from tools.sample_images import load_images

ORDINARY, OTHER = "127.0.0.2", "127.0.0.3"


async def heavy_client(base_url: str, images, stop: asyncio.Event, answers: list[int], beams: int, tokens: int) -> None:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=client_connector(OTHER), timeout=timeout) as session:
        while not stop.is_set():
            form = aiohttp.FormData()
            for k in range(32):
                name, data = images[k % len(images)]
                form.add_field("file", data, filename=f"{k}-{name}")
            form.add_field("num_beams", str(beams))
            form.add_field("max_new_tokens", str(tokens))
            async with session.post(f"{base_url}/captions", data=form) as response:
                answers.append(response.status)
                await response.read()


async def crowd_client(base_url: str, images, stop: asyncio.Event, answers: list[int], connections: int) -> None:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=client_connector(OTHER), timeout=timeout) as session:
        while not stop.is_set():
            outcomes = await closed_loop(session, f"{base_url}/caption", images, connections, connections, {})
            answers.extend(o.status for o in outcomes)


async def main(args) -> None:
    images = load_images(None, size=(640, 480))
    url = f"{args.base_url}/caption"
    alone = await run_step(
        "ordinary alone", url, images, "closed", args.concurrency, args.requests, 8, client_address=ORDINARY
    )
    stop, answers = asyncio.Event(), []
    if args.crowd:
        other, label = (
            crowd_client(args.base_url, images, stop, answers, args.crowd),
            f"a {args.crowd}-connection client",
        )
    else:
        other = heavy_client(args.base_url, images, stop, answers, args.beams, args.tokens)
        label = f"a heavy client (32 images x {args.beams} beams x {args.tokens} tokens)"
    running = asyncio.create_task(other)
    await asyncio.sleep(args.head_start_s)  # the other client's requests are queued and running first
    shared = await run_step(
        f"ordinary beside {label}", url, images, "closed", args.concurrency, args.requests, 0, client_address=ORDINARY
    )
    stop.set()
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    for step in (alone, shared):
        print(f"{step.server}: {step.throughput} img/s, p50 {step.p50_s} s, p95 {step.p95_s} s, {step.statuses}")
    answered = {status: answers.count(status) for status in set(answers)}
    print(f"p95 beside {label} / alone: {shared.p95_s / alone.p95_s:.2f}x; its answers: {answered}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base_url", help="the server, e.g. http://127.0.0.1:3000")
    parser.add_argument("--concurrency", type=int, default=4, help="the ordinary client's connections")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--head-start-s", type=float, default=2.0)
    parser.add_argument("--crowd", type=int, default=0, help="instead of the heavy client: one with N connections")
    parser.add_argument("--beams", type=int, default=1, help="the heavy client's num_beams")
    parser.add_argument("--tokens", type=int, default=100, help="the heavy client's max_new_tokens")
    asyncio.run(main(parser.parse_args()))
