"""Faults and long runs: the model worker killed under load, 200 requests into a slow server, and a
2,000-request soak. Marked slow; all run in CI."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections import Counter

import httpx
import psutil
import pytest

from support.clients import Answer, closed_loop, post_concurrently, wait_for_queue
from support.images import encode, scene
from support.nginx import NginxServer
from tools.servers import bento_server

pytestmark = pytest.mark.slow
IMAGE = encode(scene(3), "PNG")


def send_many(url: str, count: int) -> list[Answer]:
    return post_concurrently(f"{url}/caption", [IMAGE] * count)


def model_worker(server) -> psutil.Process:
    workers = [
        p for p in psutil.Process(server.process.pid).children(recursive=True) if "BlipModel" in " ".join(p.cmdline())
    ]
    assert len(workers) == 1, [p.cmdline() for p in psutil.Process(server.process.pid).children(recursive=True)]
    return workers[0]


@pytest.fixture(scope="module")
def slow_server(tiny_model_dir, tmp_path_factory):
    """One server for the module: a killed model worker is replaced, and the next test finds it
    serving again (that is what the kill tests check)."""
    env = {
        "BLIP_MODEL": tiny_model_dir,
        "BLIP_MAX_NEW_TOKENS": "100",
        "BLIP_MIN_NEW_TOKENS": "100",
        "BLIP_MAX_BATCH_SIZE": "4",
        "BLIP_MAX_FILES_PER_REQUEST": "16",
        "BLIP_MAX_QUEUED_IMAGES": "16",
    }
    with bento_server(env, tmp_path_factory.mktemp("slow") / "bentoml.log") as running:
        yield running


def test_200_concurrent_requests_each_get_one_answer(slow_server):
    started = time.monotonic()
    results = send_many(slow_server.url, 200)
    elapsed = time.monotonic() - started
    statuses = Counter(a.status for a in results)
    assert len(results) == 200 and set(statuses) <= {200, 503}, statuses
    assert statuses[200] > 0 and statuses[503] > 0, statuses
    assert all(a.retry_after == "5" for a in results if a.status == 503)
    assert elapsed < 120
    print(f"200 concurrent: {dict(statuses)} in {elapsed:.1f} s")


def kill_model_worker_under_load(server, url: str, count: int = 16):
    """SIGKILL the model worker while `count` requests to `url` are queued or in flight."""
    old_pid = model_worker(server).pid

    async def scenario():
        load = asyncio.create_task(asyncio.to_thread(post_concurrently, f"{url}/caption", [IMAGE] * count))
        await asyncio.to_thread(wait_for_queue, server, count // 2)  # a batch is being generated, others are queued
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        return killed_at, await load, time.monotonic()

    killed_at, results, finished_at = asyncio.run(scenario())
    statuses = Counter(a.status for a in results)
    print(f"killed worker {old_pid}: {dict(statuses)}, last answer {finished_at - killed_at:.1f} s after the kill")
    assert len(results) == count and set(statuses) <= {200, 503}, statuses
    assert all(set(a.body) == {"error"} and a.retry_after == "5" for a in results if a.status == 503)
    assert finished_at - killed_at > 1.0, "requests were still held when the worker died"
    assert model_worker(server).pid != old_pid


def test_killed_model_worker_is_replaced_and_no_request_hangs(slow_server):
    """BentoML's supervisor starts a new model worker on the same listening socket; the API service
    sends a request whose connection dropped once more, so held requests are answered by the new
    worker, or get a JSON 503 - never a hang."""
    kill_model_worker_under_load(slow_server, slow_server.url)
    assert httpx.get(f"{slow_server.url}/readyz").status_code == 200
    assert [a.status for a in send_many(slow_server.url, 3)] == [200, 200, 200]


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (.ci/run installs it)")
def test_killed_model_worker_through_nginx(slow_server, nginx_prefix):
    with NginxServer([slow_server.url], nginx_prefix) as proxy:
        kill_model_worker_under_load(slow_server, proxy.url)
        assert httpx.get(f"{proxy.url}/readyz").status_code == 200
        assert [a.status for a in send_many(proxy.url, 3)] == [200, 200, 200]


def test_soak_2000_requests_memory_stays_flat(tiny_model_dir, tmp_path):
    env = {"BLIP_MODEL": tiny_model_dir, "BLIP_MAX_NEW_TOKENS": "8"}
    with bento_server(env, tmp_path / "soak.log") as server:
        processes = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]

        def rss() -> dict[int, int]:
            return {p.pid: p.memory_info().rss for p in processes}

        def soak(total: int) -> dict[int, int]:
            """`total` requests from 8 clients in a closed loop; counts by status."""
            return dict(closed_loop(f"{server.url}/caption", IMAGE, clients=8, total=total))

        assert soak(300) == {200: 300}  # warm-up
        before = rss()
        assert soak(2000) == {200: 2000}
        after = rss()
    growth = {pid: after[pid] / before[pid] - 1 for pid in before}
    print("soak RSS growth per process: " + ", ".join(f"{before[p] >> 20}->{after[p] >> 20} MB" for p in before))
    assert max(growth.values()) < 0.10, growth


def gauge_lines(server) -> list[str]:
    """The live gauges' lines on /metrics: requests in progress, images queued and in a batch."""
    lines = httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines()
    names = ("blip_images_queued", "blip_images_in_batch", "bentoml_service_request_in_progress", "blip_channels_open")
    return [line for line in lines if line.startswith(names) and '"/readyz"' not in line]


def gauges_in_use(server) -> list[str]:
    """The live gauges that read above 0. An API worker's channels to the model workers are
    connections held open, not requests: channels_open."""
    return [line for line in gauge_lines(server) if "blip_channels_open" not in line and float(line.split()[-1])]


def channels_open(server) -> float:
    """The channels open (blip_channels_open): one from each API worker that has sent a call to each
    model worker (shared/channel.py)."""
    return sum(float(line.split()[-1]) for line in gauge_lines(server) if line.startswith("blip_channels_open"))


def test_readyz_is_503_at_once_while_a_killed_model_worker_reloads_and_no_count_is_left_behind(slow_server):
    """Before: /readyz gave no answer for as long as the new worker loaded (BentoML's own check
    waited on the dead worker's socket), then 200; and the dead worker's queued and in-progress
    counts read on forever on /metrics (a KEDA query scaled on them)."""
    kill_model_worker_under_load(slow_server, slow_server.url)  # leaves it loading again
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        asked = time.monotonic()
        seen.append((httpx.get(f"{slow_server.url}/readyz", timeout=5).status_code, time.monotonic() - asked))
        if seen[-1][0] == 200:
            break
        time.sleep(0.2)
    assert seen[-1][0] == 200 and {status for status, _ in seen} <= {200, 503}, seen
    assert max(took for _, took in seen) < 1.5, seen

    old_pid = model_worker(slow_server).pid
    os.kill(old_pid, signal.SIGKILL)
    time.sleep(0.3)
    asked = time.monotonic()
    assert httpx.get(f"{slow_server.url}/readyz", timeout=5).status_code == 503 and time.monotonic() - asked < 1.5
    deadline = time.monotonic() + 60
    while httpx.get(f"{slow_server.url}/readyz", timeout=5).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    assert gauges_in_use(slow_server) == []


def test_a_killed_api_worker_leaves_no_requests_in_progress_behind(slow_server):
    """Before: an API worker killed with 35 requests in flight left the in-progress gauge KEDA
    scales on at 35 for good."""
    [api] = [
        p
        for p in psutil.Process(slow_server.process.pid).children(recursive=True)
        if "--service-name" in p.cmdline() and "CaptionAPI" in p.cmdline()
    ]

    import concurrent.futures

    def caption() -> int | str:
        try:
            return httpx.post(f"{slow_server.url}/caption", files={"file": ("p.png", IMAGE)}, timeout=60).status_code
        except httpx.HTTPError as exc:  # the worker holding it was killed
            return type(exc).__name__

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        load = [pool.submit(caption) for _ in range(12)]
        wait_for_queue(slow_server, 6)
        api.kill()
        results = [future.result() for future in load]
    assert len(results) == 12
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{slow_server.url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    time.sleep(1)
    assert gauges_in_use(slow_server) == []
    assert [a.status for a in send_many(slow_server.url, 3)] == [200, 200, 200]
    assert channels_open(slow_server) == 1  # the new worker's; the killed worker's closed with it
