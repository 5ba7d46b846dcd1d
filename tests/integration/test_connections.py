"""Hostile clients against the real server, directly and through nginx: silent and slow connections,
client-chosen paths, and a mix of costly uploads beside normal traffic."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from support import hostile
from support.clients import multipart_head
from support.images import encode, exif_with_orientation_and_an_oversized_short, header_only_jpeg, scene
from support.nginx import NginxServer
from tools.metrics import percentile
from tools.servers import bento_server

pytestmark = pytest.mark.slow  # starts the real server
needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (.ci/run installs it)")
TIMEOUT_S = 2  # BLIP_BODY_TIMEOUT_S and BLIP_HEADER_TIMEOUT_S of this module's server
IMAGE = encode(scene(5, (640, 480)), "JPEG")


@pytest.fixture(scope="module")
def strict_server(tiny_model_dir, tmp_path_factory):
    env = {
        "BLIP_MODEL": tiny_model_dir,
        "BLIP_BODY_TIMEOUT_S": str(TIMEOUT_S),
        "BLIP_HEADER_TIMEOUT_S": str(TIMEOUT_S),
        # One torch thread leaves a core for the API worker and this test's own client. With torch
        # on every core, any other busy thread stalls torch's threads at their barriers, which
        # measures core sharing rather than the server's defences (README: Troubleshooting).
        "BLIP_TORCH_THREADS": "1",
    }
    with bento_server(env, tmp_path_factory.mktemp("strict") / "bentoml.log") as running:
        yield running


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=TIMEOUT_S * 5)


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started, data = time.monotonic(), b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def trickle(sock: socket.socket, payload: bytes, interval_s: float) -> None:
    """Send `payload` a byte at a time while the server keeps the connection open."""
    for byte in payload:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return
        time.sleep(interval_s)


def test_a_trickled_body_is_a_json_408_with_its_request_id(strict_server):
    with connect(strict_server.url) as sock:
        sock.sendall(multipart_head(10_000))
        sock.settimeout(0.3)
        started = time.monotonic()
        answer = b""
        while time.monotonic() - started < TIMEOUT_S * 4 and b"\r\n\r\n{" not in answer:
            try:
                sock.sendall(b"x")  # one byte every 0.3 s: never a stall, never done
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"x-request-id: trickle-1" in answer.lower()
    assert b'{"error":"the request body did not arrive within 2 s; send it faster or smaller"}' in answer
    assert TIMEOUT_S - 0.5 < elapsed < TIMEOUT_S + 2
    time.sleep(0.5)
    assert "request_id=trickle-1 method=POST path=/caption status=408" in strict_server.log_text()


def test_a_silent_connection_is_closed(strict_server):
    with connect(strict_server.url) as sock:
        answer, elapsed = read_until_closed(sock)
    assert answer == b""  # closed without an answer, as a keep-alive timeout closes
    assert TIMEOUT_S - 0.5 < elapsed < TIMEOUT_S + 2


def test_trickled_headers_are_cut_off(strict_server):
    with connect(strict_server.url) as sock:
        started = time.monotonic()
        trickle(sock, b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100, interval_s=0.2)
        answer, _ = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"no complete request headers within 2 s' in answer
    assert time.monotonic() - started < TIMEOUT_S + 2


def test_an_idle_keep_alive_connection_is_closed(strict_server):
    with connect(strict_server.url) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        answer, elapsed = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert elapsed < max(TIMEOUT_S, 5) + 2  # uvicorn's keep-alive (5 s) or the header timeout


def test_bytes_that_are_not_http_get_a_json_400(strict_server):
    with connect(strict_server.url) as sock:
        sock.sendall(b"\x16\x03\x01 this is not http\r\n\r\n")
        answer, _ = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.endswith(b'{"error": "the request is not valid HTTP/1.1"}\n')


@pytest.mark.parametrize("path", ["/readyz", "/livez", "/metrics", "/docs.json", "/no/such/path"])
def test_every_response_carries_a_request_id(strict_server, path):
    sent = "id" + path.replace("/", "-")
    response = httpx.get(f"{strict_server.url}{path}", headers={"X-Request-ID": sent})
    assert response.headers["x-request-id"] == sent


def test_an_unknown_path_is_a_json_404(strict_server):
    response = httpx.post(f"{strict_server.url}/captions/../../etc/passwd")
    assert response.status_code == 404
    assert response.json() == {"error": "no such path; the API is POST /caption, POST /captions (see /docs.json)"}


def test_unknown_paths_add_no_metric_series(strict_server):
    def metrics_size() -> int:
        return len(httpx.get(f"{strict_server.url}/metrics").content)

    with httpx.Client(base_url=strict_server.url) as client:
        client.get("/warm-up-path")  # the first 404 may add fixed series (status 404 on a known label)
        before = metrics_size()
        statuses = Counter(client.get(f"/unknown-{i}").status_code for i in range(2000))
    after = metrics_size()
    assert statuses == {404: 2000}
    print(f"/metrics: {before} bytes before 2,000 unknown paths, {after} after")
    assert after - before < 4096


# Through nginx, with its timeouts shortened the same way.
NGINX_TIMEOUTS = {"client_header_timeout": f"{TIMEOUT_S}s", "client_body_timeout": f"{TIMEOUT_S}s"}


@pytest.fixture
def strict_nginx(strict_server, nginx_prefix):
    with NginxServer([strict_server.url], nginx_prefix, NGINX_TIMEOUTS) as running:
        yield running


@needs_nginx
def test_nginx_answers_unknown_paths_itself(strict_nginx, strict_server):
    response = httpx.get(f"{strict_nginx.url}/unknown-via-nginx")
    assert response.status_code == 404
    assert response.json() == {"error": "no such path; the API is POST /caption, POST /captions (see /docs.json)"}
    assert "unknown-via-nginx" not in strict_server.log_text()


@needs_nginx
def test_nginx_cuts_off_silent_and_trickling_clients(strict_nginx, strict_server):
    with connect(strict_nginx.url) as sock:
        _, elapsed = read_until_closed(sock)
    assert elapsed < TIMEOUT_S + 2
    with connect(strict_nginx.url) as sock:
        sock.sendall(multipart_head(10_000))  # then silence
        answer, elapsed = read_until_closed(sock)
    assert elapsed < TIMEOUT_S + 2 and b" 5" not in answer[:12]  # closed (or 408), never a 5xx
    assert "trickle-1" not in strict_server.log_text().split("status=408")[-1]  # never reached the bento


@needs_nginx
def test_nginx_limits_connections_per_client(strict_server, nginx_prefix):
    directives = {**NGINX_TIMEOUTS, "limit_conn": "per_client 2"}
    with NginxServer([strict_server.url], nginx_prefix, directives) as proxy:
        held = [connect(proxy.url) for _ in range(2)]
        for sock in held:  # two requests whose bodies are still arriving
            sock.sendall(multipart_head(10_000))
        time.sleep(0.3)
        response = httpx.post(f"{proxy.url}/caption", files={"file": ("p.jpg", IMAGE)})
        for sock in held:
            sock.close()
    assert response.status_code == 429
    assert response.json() == {"error": "too many connections from this address; retry shortly"}


# Costly uploads under the limits, mixed with normal traffic.
def big_noise_png(width: int, height: int) -> bytes:
    tile = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    return encode(Image.fromarray(np.tile(tile, (height // 64 + 1, width // 64 + 1, 1))[:height, :width]), "PNG")


def api_worker(server) -> psutil.Process:
    workers = [
        p for p in psutil.Process(server.process.pid).children(recursive=True) if "CaptionAPI" in " ".join(p.cmdline())
    ]
    assert len(workers) == 1
    return workers[0]


def api_memory(server) -> int:
    """Resident memory of the API worker and its decode processes."""
    worker = api_worker(server)
    return sum(p.memory_info().rss for p in [worker, *worker.children(recursive=True)])


# A client that reuses a connection the server is closing for idleness (after TIMEOUT_S) can
# send into the close and get no answer; as clients should, these let idle connections go first.
CLIENT_LIMITS = httpx.Limits(keepalive_expiry=TIMEOUT_S / 2)


async def normal_traffic(url: str, count: int, concurrency: int) -> list[tuple[int, float]]:
    async with httpx.AsyncClient(timeout=120, limits=CLIENT_LIMITS) as client:
        slots = asyncio.Semaphore(concurrency)

        async def one() -> tuple[int, float]:
            async with slots:
                started = time.perf_counter()
                response = await client.post(f"{url}/caption", files={"file": ("p.jpg", IMAGE)})
                return response.status_code, time.perf_counter() - started

        return await asyncio.gather(*(one() for _ in range(count)))


async def bombs(url: str, uploads: list[bytes], rounds: int) -> list[int]:
    async with httpx.AsyncClient(timeout=120, limits=CLIENT_LIMITS) as client:
        statuses = []
        for _ in range(rounds):
            answers = await asyncio.gather(
                *(client.post(f"{url}/caption", files={"file": ("b", data)}) for data in uploads)
            )
            statuses += [a.status_code for a in answers]
        return statuses


def test_costly_uploads_do_not_starve_normal_requests_or_keep_memory(strict_server):
    url = strict_server.url
    bomb_uploads = [
        big_noise_png(6324, 6324),
        big_noise_png(12000, 600),
        header_only_jpeg(),
        encode(scene(9), "JPEG", exif=exif_with_orientation_and_an_oversized_short()),
    ] * 2
    asyncio.run(normal_traffic(url, 20, 4))  # warm-up
    asyncio.run(bombs(url, bomb_uploads, 1))
    rss_start = api_memory(strict_server)

    quiet = asyncio.run(normal_traffic(url, 60, 4))

    async def under_attack():
        return await asyncio.gather(normal_traffic(url, 60, 4), bombs(url, bomb_uploads, 3))

    attacked, bomb_statuses = asyncio.run(under_attack())
    rss_end = api_memory(strict_server)

    quiet_p95 = percentile([t for _, t in quiet], 95)
    attacked_p95 = percentile([t for _, t in attacked], 95)
    print(
        f"normal p95 quiet {quiet_p95:.3f} s, under attack {attacked_p95:.3f} s; bombs {dict(Counter(bomb_statuses))}; "
        f"API worker and decode processes RSS {rss_start >> 20} -> {rss_end >> 20} MB"
    )
    assert [s for s, _ in quiet + attacked] == [200] * 120
    assert max(bomb_statuses) < 500 and set(bomb_statuses) == {200, 415}
    assert attacked_p95 < 2 * max(quiet_p95, 0.05)
    assert rss_end < rss_start * 1.2


def test_the_api_worker_loads_no_torch(strict_server):
    worker = api_worker(strict_server)
    maps = Path(f"/proc/{worker.pid}/maps").read_text()
    print(f"API worker RSS {worker.memory_info().rss >> 20} MB")
    assert "libtorch" not in maps


# One generator per class of hostile file (tests/support/hostile.py), at sizes near the limits:
# (file, the statuses it may get).
HOSTILE_CLASSES = {
    "quadratic: EXIF header repeated, 2 MB": (hostile.exif_prefix_repeated(2_000_000), {415}),
    "quadratic: 2.6M empty APP segments": (hostile.empty_app_segments(2_600_000), {415}),
    "quadratic: 870k empty PNG chunks": (hostile.empty_png_chunks(870_000), {415}),
    "quadratic: GIF comment in 1-byte blocks": (hostile.gif_comment_in_tiny_blocks(1_000_000), {415}),
    "amplification: EXIF in JPEG": (hostile.amplified_exif("JPEG", 2_700, 30_000), {413, 415}),
    "amplification: TIFF tags": (hostile.amplified_tiff(900, 1_000_000), {413}),
    "amplification: MPF index": (hostile.mpf_index(900, 50_000), {413}),
    "decode: 100+ empty scans": (hostile.empty_scans(2_000), {415}),
    "bypass: header-only MPO": (hostile.header_only_mpo(), {415}),
    "bypass: arithmetic JPEG": (hostile.arithmetic_jpeg(), {415}),
    "cost: 16-bit grey PNG, 40 MP": (hostile.flat_png("I;16", 6_324), {200}),
    "cost: RGBA PNG, 40 MP": (hostile.flat_png("RGBA", 6_324), {200}),
    "cost: TIFF tile of 16k x 16k": (hostile.tiff_one_big_tile(16_384), {415}),
    "cost: RLE BMP": (hostile.bmp_rle8(6_000, 6_000), {415}),
}


async def hostile_uploads(url: str, rounds: int) -> list[tuple[str, int, float]]:
    """Every class at once, `rounds` times: (class, status, seconds)."""
    async with httpx.AsyncClient(timeout=120, limits=CLIENT_LIMITS) as client:

        async def one(name: str, data: bytes) -> tuple[str, int, float]:
            started = time.perf_counter()
            response = await client.post(f"{url}/caption", files={"file": ("h", data)})
            return name, response.status_code, time.perf_counter() - started

        results = []
        for _ in range(rounds):
            results += await asyncio.gather(*(one(name, data) for name, (data, _) in HOSTILE_CLASSES.items()))
        return results


def test_every_class_of_hostile_file_is_answered_while_normal_requests_stay_fast(strict_server):
    url = strict_server.url
    asyncio.run(normal_traffic(url, 20, 2))  # warm-up
    asyncio.run(hostile_uploads(url, 1))
    rss_start = api_memory(strict_server)
    quiet = asyncio.run(normal_traffic(url, 40, 2))

    async def under_attack():
        return await asyncio.gather(normal_traffic(url, 40, 2), hostile_uploads(url, 2))

    attacked, hostile_results = asyncio.run(under_attack())
    rss_end = api_memory(strict_server)
    quiet_p95 = percentile([t for _, t in quiet], 95)
    attacked_p95 = percentile([t for _, t in attacked], 95)
    slowest = max(hostile_results, key=lambda result: result[2])
    print(
        f"normal p95 quiet {quiet_p95:.3f} s, beside every hostile class {attacked_p95:.3f} s; slowest hostile "
        f"answer {slowest[2]:.2f} s ({slowest[0]}); API worker and decode processes RSS "
        f"{rss_start >> 20} -> {rss_end >> 20} MB"
    )
    assert [s for s, _ in quiet + attacked] == [200] * 80
    wrong = [(name, status) for name, status, _ in hostile_results if status not in HOSTILE_CLASSES[name][1]]
    assert not wrong
    assert slowest[2] < 30
    # On 2 cores the hostile decodes take CPU beside the normal ones: a normal request may lose ~0.1 s
    # (with the step-level decoder a quiet one takes ~0.07-0.13 s, so 2x alone is within noise; a
    # 2-core AMD EPYC measured 0.07-0.15 s lost, once 0.150), but it is never held behind a hostile
    # one, which takes ~5 s.
    assert attacked_p95 < max(2 * quiet_p95, quiet_p95 + 0.25)
    assert rss_end < rss_start * 1.5


def test_a_captions_request_of_heavy_images_does_not_hold_every_decode(strict_server):
    """Six 40 MP images in one /captions take turns in the large-image pool; a /caption of a small
    image beside them is decoded at once by the small-image pool."""
    url = strict_server.url
    heavy = [("file", (f"h{i}.png", hostile.flat_png("RGBA", 6_324))) for i in range(6)]

    async def both():
        async with httpx.AsyncClient(timeout=120, limits=CLIENT_LIMITS) as client:
            batch = asyncio.create_task(client.post(f"{url}/captions", files=heavy))
            await asyncio.sleep(1.0)
            small = await normal_traffic(url, 10, 1)
            return await batch, small

    batch, small = asyncio.run(both())
    assert batch.status_code == 200 and all(entry.get("caption") for entry in batch.json()["captions"])
    assert [s for s, _ in small] == [200] * 10
    assert max(t for _, t in small) < 2.0, small


def test_memory_goes_back_after_a_burst_of_captions_requests(strict_server):
    """100 concurrent /captions of 8 photos each (most refused with 503: the queue is bounded),
    then the API worker and its decode processes are back within 2x their resident size."""
    url = strict_server.url
    photos = [("file", (f"p{i}.jpg", encode(scene(60 + i, (1600, 1200)), "JPEG"))) for i in range(8)]
    asyncio.run(normal_traffic(url, 10, 2))
    fresh = api_memory(strict_server)

    async def burst():
        async with httpx.AsyncClient(
            timeout=120, limits=httpx.Limits(max_connections=100, keepalive_expiry=TIMEOUT_S / 2)
        ) as client:
            answers = await asyncio.gather(*(client.post(f"{url}/captions", files=photos) for _ in range(100)))
            return Counter(answer.status_code for answer in answers)

    statuses = asyncio.run(burst())
    peak = api_memory(strict_server)
    time.sleep(5)
    after = api_memory(strict_server)
    print(f"statuses {dict(statuses)}; API worker and decode processes RSS {fresh >> 20} -> {after >> 20} MB")
    assert set(statuses) <= {200, 503} and statuses[200] > 0
    assert after <= 2 * fresh, f"{fresh >> 20} MB fresh, {peak >> 20} MB after the burst, {after >> 20} MB 5 s later"


def test_a_client_that_hangs_up_mid_body_is_no_server_error(server):
    """Before: Starlette's ClientDisconnect reached BentoML as an exception: each such request was
    a 500 on /metrics and a ~20 KB traceback in the log. Now it ends as 499 (nginx's client closed
    request), and is no longer in progress on /metrics."""

    def server_errors() -> float:
        lines = httpx.get(f"{server.url}/metrics").text.splitlines()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in lines
            if line.startswith("bentoml_service_request_total{") and 'http_response_code="5' in line
        )

    chat_head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100000\r\n\r\n{"model": "m", "messages": [{"role": "user", "content": "'
    )
    log_before = server.log_path.read_text().count("Traceback")
    errors_before = server_errors()
    for head in (multipart_head(100_000, "/caption"), multipart_head(100_000, "/captions"), chat_head):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port)) as connection:
                connection.sendall(head + b"\xff" * 5000)
                time.sleep(0.2)  # the server is reading the body when the client goes
    time.sleep(1)
    assert server_errors() == errors_before
    log = server.log_path.read_text()
    assert log.count("Traceback") == log_before
    assert log.count("status=499") >= 9
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    routes = ('endpoint="/caption"', 'endpoint="/captions"', 'endpoint="/v1/chat/completions"')
    in_progress = [
        line
        for line in httpx.get(f"{server.url}/metrics").text.splitlines()
        if line.startswith("bentoml_service_request_in_progress") and any(route in line for route in routes)
    ]
    assert len(in_progress) == 3 and all(line.endswith(" 0.0") for line in in_progress), in_progress


def test_slow_clients_declaring_large_bodies_leave_the_reading_budget_to_others(server):
    """Before: four sockets declaring 64 MB /captions bodies (the 256 MB budget) and trickling
    them made every small upload a 503 for as long as they trickled."""
    sockets = []
    try:
        for _ in range(4):
            connection = socket.create_connection(("127.0.0.1", server.port))
            connection.sendall(multipart_head(64 * 1024 * 1024, "/captions") + b"\xff" * 100)
            sockets.append(connection)
        time.sleep(0.5)
        image = encode(scene(11), "JPEG")
        answers = [httpx.post(f"{server.url}/caption", files={"file": ("a.jpg", image)}, timeout=60) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200], answers[0].text
    finally:
        for connection in sockets:
            connection.close()
