"""The real `bentoml serve` with the tiny model: what a client sends, what it gets back."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import aiohttp
import httpx
import pytest

from support.clients import batch_histogram, post_caption, post_concurrently
from support.error_cases import ERROR_CASES, JPEG
from support.images import encode, scene, upload_corpus

pytestmark = pytest.mark.slow  # starts the real server

CORPUS = upload_corpus()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_format_gets_the_reference_caption(server, reference, name):
    response = post_caption(server, files={"file": (name, CORPUS[name])})
    assert response.status_code == 200, response.text
    assert response.json() == {"caption": reference.caption(CORPUS[name])}
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("content_type", ["image/jpg", "application/octet-stream", "text/plain"])
def test_the_part_content_type_is_not_trusted(server, reference, content_type):
    data = CORPUS["photo.jpg"]
    response = post_caption(server, files={"file": ("upload", data, content_type)})
    assert response.status_code == 200, response.text
    assert response.json()["caption"] == reference.caption(data)


def test_seed_style_aiohttp_client(server, reference):
    data = CORPUS["photo.png"]

    async def send() -> tuple[int, dict]:
        form = aiohttp.FormData()
        form.add_field("file", data, filename="photo.png", content_type="image/png")
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.url}/caption", data=form) as response:
                return response.status, await response.json()

    status, body = asyncio.run(send())
    assert status == 200
    assert body == {"caption": reference.caption(data)}


def test_prompt_and_generation_options(server, reference):
    data = CORPUS["photo.webp"]
    form = {"prompt": "a photography of", "max_new_tokens": "6", "num_beams": "2"}
    response = post_caption(server, files={"file": ("p.webp", data)}, data=form)
    assert response.status_code == 200, response.text
    caption = response.json()["caption"]
    assert caption.startswith("a photography of")
    assert caption == reference.caption(data, prompt="a photography of", max_new_tokens=6, num_beams=2)


def test_concurrent_requests_are_batched_and_all_correct(server, reference):
    images = [encode(scene(100 + i), "PNG") for i in range(24)]
    before = batch_histogram(server)

    answers = post_concurrently(f"{server.url}/caption", images)
    assert [a.status for a in answers] == [200] * len(images)
    assert [a.body["caption"] for a in answers] == [reference.caption(data) for data in images]

    after = batch_histogram(server)
    batches = after["le=+Inf"] - before.get("le=+Inf", 0)
    single = after["le=1.0"] - before.get("le=1.0", 0)
    assert 0 < batches < len(images), "24 concurrent requests should have shared batches"
    assert batches - single >= 1, "at least one batch held more than one image"


def test_readyz_and_livez(server):
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert httpx.get(f"{server.url}/livez").status_code == 200
    assert "blip_batch_size" in httpx.get(f"{server.url}/metrics").text


def test_one_log_line_per_request(server):
    response = post_caption(
        server, files={"file": ("p.png", CORPUS["photo.png"])}, headers={"X-Request-ID": "log-me-42"}
    )
    assert response.headers["x-request-id"] == "log-me-42"
    # The line is written as the request ends, just after the answer's last byte: wait for it.
    deadline = time.monotonic() + 5
    while "request_id=log-me-42" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in server.log_text().splitlines() if "request_id=log-me-42" in line]
    assert len(lines) == 1
    assert "image=160x120" in lines[0] and "status=200" in lines[0] and "latency_ms=" in lines[0]


def test_chunked_upload_over_10_mb_is_413(server):
    boundary = "xyz"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'.encode()

    def body():  # no Content-Length: the server has to count
        yield head
        for _ in range(12):
            yield b"\0" * (1024 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = httpx.post(
        f"{server.url}/caption",
        content=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json()["error"].startswith("the request body is larger")


def test_a_url_in_the_file_field_is_never_fetched(server):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(3)
    port = listener.getsockname()[1]
    connections = []
    threading.Thread(target=lambda: connections.append(_accept(listener)), daemon=True).start()

    response = post_caption(server, data={"file": f"http://127.0.0.1:{port}/cat.jpg"})
    assert response.status_code == 400
    time.sleep(3.5)  # the listener waits 3 s for a connection that must not come
    listener.close()
    assert connections == [None], "the server connected to the URL it was sent"


def _accept(listener: socket.socket):
    try:
        connection, _ = listener.accept()
        connection.close()
        return "connected"
    except OSError:
        return None


def test_server_is_ready_after_bad_input(server, reference):
    for files, data, _, _ in ERROR_CASES.values():
        post_caption(server, files=files, data=data)
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    response = post_caption(server, files={"file": ("p.jpg", JPEG)})
    assert response.json() == {"caption": reference.caption(JPEG)}


def test_post_on_readyz_is_json_405_naming_what_works(server):
    response = httpx.post(f"{server.url}/readyz")
    assert response.status_code == 405
    assert response.json() == {"error": "POST is not allowed on /readyz; use GET, HEAD"}


def test_get_on_caption_is_json_405(server):
    response = httpx.get(f"{server.url}/caption")
    assert response.status_code == 405
    assert response.json() == {"error": "GET is not allowed on /caption; use POST"}
    assert response.headers["x-request-id"]


def test_info_says_what_is_served(server, tiny_model_dir):
    from blip_serve import __version__

    info = httpx.get(f"{server.url}/info", timeout=10).json()
    assert info["name"] == "blip-serve" and info["version"] == __version__
    assert info["model"] == tiny_model_dir and info["random_weights"] is True
    assert (info["device"], info["precision"], info["compiled"]) == ("cpu", "fp32", False)
    assert info["max_batch_size"] == 16 and info["max_queued_images"] == 128 and info["max_files_per_request"] == 32
    log = server.log_text()
    assert (
        f"blip-serve {__version__}: BLIP loaded from {tiny_model_dir} (RANDOM WEIGHTS: gibberish captions) on cpu"
        in log
    )


def test_the_docs_page_makes_no_request_outside_the_server(server):
    import re

    page = httpx.get(f"{server.url}/", timeout=10)
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert "googletagmanager" not in page.text and "http" not in page.text.replace("http-equiv", "")
    for asset in re.findall(r'(?:src|href)="\./([^"]+)"', page.text):
        assert httpx.get(f"{server.url}/{asset}", timeout=10).status_code == 200, asset
