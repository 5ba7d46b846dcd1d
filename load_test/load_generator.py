"""The load generator: closed loop (C clients, each sending its next request when the last one
answers) and open loop (Poisson arrivals at a fixed rate, latency counted from the scheduled send,
so a slow server cannot hide its queue: no coordinated omission)."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
from tqdm import tqdm

from tools.metrics import parse_batch_histogram, percentile


@dataclass
class TimedResponse:
    status: int  # 0: no HTTP answer (connection error, timeout)
    latency_s: float
    error: str | None = None


@dataclass
class StepReport:
    server: str
    mode: str  # "closed" or "open"
    load: float  # concurrency (closed) or arrival rate in req/s (open)
    requests: int
    duration_s: float
    throughput: float  # successful images per second
    p50_s: float
    p95_s: float
    p99_s: float
    max_s: float
    statuses: dict[str, int]
    errors: dict[str, int]
    batch_sizes: dict[str, float] = field(default_factory=dict)  # bucket upper bound -> batches
    mean_batch_size: float | None = None
    model_busy: float | None = None  # share of the step's time the model spent computing batches
    mean_step_captions: float | None = None  # captions a decoder step advanced, on average (of the seats)
    cpu_ms_per_image: float | None = None  # CPU the whole server spent per image answered
    api_cpu_ms_per_image: float | None = None  # of which blip-serve's API side (HTTP, decode, resize)
    decode_cpu_ms_per_image: float | None = None  # of the API side, its decode processes
    model_cpu_ms_per_image: float | None = None  # and its model side (HTTP, batching, BLIP)
    model_loop_cpu_ms_per_image: float | None = None  # of which its event loop: the calls, the batcher

    def row(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


# Closed-loop modes: "mixed" (--mixed) gives each client its own caption length and prompt, as
# different apps and SDK users send.
CLOSED_MODES = ("closed", "mixed")
MIXED_PROMPTS = ["a picture of", "a photo of", "an image of", "there is", "this is", "a view of", "a close up of", ""]


def mixed_fields(client: int) -> dict[str, str]:
    """Client `client`'s options under --mixed: 8 distinct max_new_tokens (12, 14, ... 26; 19 on
    average) and 8 prompts (one of them none)."""
    fields = {"max_new_tokens": str(12 + 2 * (client % 8))}
    if MIXED_PROMPTS[client % 8]:
        fields["prompt"] = MIXED_PROMPTS[client % 8]
    return fields


async def send_one(
    session: aiohttp.ClientSession, url: str, image: tuple[str, bytes], headers: dict, fields: dict | None = None
) -> TimedResponse:
    name, data = image
    form = aiohttp.FormData()
    form.add_field("file", data, filename=name, content_type="application/octet-stream")
    for key, value in (fields or {}).items():
        form.add_field(key, value)
    started = time.perf_counter()
    try:
        async with session.post(url, data=form, headers=headers) as response:
            body = await response.read()
            error = None
            if response.status != 200:
                error = f"{response.status}: {body[:120].decode('utf-8', 'replace')}"
            return TimedResponse(response.status, time.perf_counter() - started, error)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return TimedResponse(0, time.perf_counter() - started, type(exc).__name__)


async def closed_loop(
    session, url, images, concurrency: int, total: int, headers: dict, progress=None, mixed: bool = False
) -> list[TimedResponse]:
    outcomes: list[TimedResponse] = []
    counter = itertools.count()
    image_cycle = itertools.cycle(images)

    async def client(number: int) -> None:
        fields = mixed_fields(number) if mixed else None
        while next(counter) < total:
            outcomes.append(await send_one(session, url, next(image_cycle), headers, fields))
            if progress:
                progress.update()

    await asyncio.gather(*(client(number) for number in range(concurrency)))
    return outcomes


async def open_loop(
    session, url, images, rate: float, total: int, headers: dict, seed: int = 0, progress=None
) -> list[TimedResponse]:
    rng = random.Random(seed)
    image_cycle = itertools.cycle(images)
    start = time.perf_counter()
    scheduled = 0.0
    tasks = []

    async def timed(send_at: float, image) -> TimedResponse:
        outcome = await send_one(session, url, image, headers)
        # From the scheduled send time: time spent waiting for a free connection counts too.
        outcome.latency_s = time.perf_counter() - (start + send_at)
        if progress:
            progress.update()
        return outcome

    for _ in range(total):
        delay = start + scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(timed(scheduled, next(image_cycle))))
        scheduled += rng.expovariate(rate)
    return list(await asyncio.gather(*tasks))


async def read_batch_histogram(session, base_url: str) -> dict[str, float]:
    """parse_batch_histogram of the server's /metrics; {} when the server is not a BentoML one."""
    try:
        async with session.get(f"{base_url}/metrics") as response:
            if response.status != 200:
                return {}
            return parse_batch_histogram(await response.text())
    except aiohttp.ClientError:
        return {}


def batch_distribution(before: dict[str, float], after: dict[str, float]) -> tuple[dict[str, float], float | None]:
    """Batches per bucket during the step ("<=8": 3 means three batches of 5 to 8 images) and the
    mean batch size (images / batches)."""
    if not after:
        return {}, None
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    bounds = sorted((key for key in delta if key.startswith("le=")), key=lambda k: float(k[3:]))
    per_bucket, previous = {}, 0.0
    for key in bounds:
        if delta[key] - previous:
            per_bucket["<=" + key[3:].replace(".0", "")] = delta[key] - previous
        previous = delta[key]
    batches = delta.get("count", 0.0)
    return per_bucket, (delta.get("sum", 0.0) / batches if batches else None)


def client_connector(address: str | None = None) -> aiohttp.TCPConnector:
    """Unlimited connections, from `address` if given (the server shares its model by client address)."""
    return aiohttp.TCPConnector(limit=0, keepalive_timeout=2, local_addr=(address, 0) if address else None)


async def run_step(
    server: str,
    url: str,
    images,
    mode: str,
    load: float,
    total: int,
    warmup: int,
    headers: dict | None = None,
    timeout_s: float = 600,
    show_progress: bool = True,
    cpu_seconds=None,
    client_address: str | None = None,
) -> StepReport:
    """One step of a sweep: warm up, then `total` requests at concurrency (or rate) `load`.
    `cpu_seconds`: a function giving the server's CPU so far ({"total": s, "api": s, ...}), read
    before and after the step. `client_address`: the local address to send from (a loopback
    address such as 127.0.0.2: another client to the server's fair queue)."""
    headers = headers or {}
    base_url = url.rsplit("/caption", 1)[0]
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout can close them under us.
    connector = client_connector(client_address)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        if warmup:
            await closed_loop(session, url, images, max(1, int(load)) if mode in CLOSED_MODES else 1, warmup, headers)
        before = await read_batch_histogram(session, base_url)
        cpu_before = cpu_seconds() if cpu_seconds else {}
        label = f"{server} {mode} {'c' if mode in CLOSED_MODES else 'rate '}{load:g}"
        # disable=None: no bar when stderr is not a terminal (a log file)
        with tqdm(total=total, desc=label, leave=False, disable=None if show_progress else True) as progress:
            started = time.perf_counter()
            if mode in CLOSED_MODES:
                outcomes = await closed_loop(session, url, images, int(load), total, headers, progress, mode == "mixed")
            else:
                outcomes = await open_loop(session, url, images, load, total, headers, progress=progress)
            duration = time.perf_counter() - started
        cpu_after = cpu_seconds() if cpu_seconds else {}
        after = await read_batch_histogram(session, base_url)

    ok = [o.latency_s for o in outcomes if o.status == 200]
    latencies = [o.latency_s for o in outcomes]
    buckets, mean_batch = batch_distribution(before, after)
    cpu_ms = {
        part: round((cpu_after[part] - cpu_before[part]) * 1000 / len(ok), 2)
        for part in cpu_after
        if ok and cpu_after[part] is not None
    }
    busy = (after["busy_s"] - before.get("busy_s", 0.0)) / duration if "busy_s" in after else None
    steps = after.get("steps", 0.0) - before.get("steps", 0.0)
    step_captions = (after["step_captions"] - before.get("step_captions", 0.0)) / steps if steps else None
    return StepReport(
        server=server,
        mode=mode,
        load=load,
        requests=len(outcomes),
        duration_s=round(duration, 3),
        throughput=round(len(ok) / duration, 3),
        p50_s=round(percentile(latencies, 50), 3),
        p95_s=round(percentile(latencies, 95), 3),
        p99_s=round(percentile(latencies, 99), 3),
        max_s=round(max(latencies), 3),
        statuses=dict(Counter(str(o.status) for o in outcomes)),
        errors=dict(Counter(o.error for o in outcomes if o.error)),
        batch_sizes=buckets,
        mean_batch_size=None if mean_batch is None else round(mean_batch, 2),
        model_busy=None if busy is None else round(busy, 3),
        mean_step_captions=None if step_captions is None else round(step_captions, 2),
        cpu_ms_per_image=cpu_ms.get("total"),
        api_cpu_ms_per_image=cpu_ms.get("api"),
        decode_cpu_ms_per_image=cpu_ms.get("decode"),
        model_cpu_ms_per_image=cpu_ms.get("model"),
        model_loop_cpu_ms_per_image=cpu_ms.get("model_loop"),
    )
