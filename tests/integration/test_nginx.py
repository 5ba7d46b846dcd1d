"""The real nginx (nginx/nginx.conf) in front of the real `bentoml serve`, as docker-compose runs them."""

from __future__ import annotations

import re
import shutil
import time

import httpx
import pytest

from support.clients import post_concurrently
from support.images import encode, scene
from support.nginx import NginxServer
from tools.servers import bento_server, free_port

pytestmark = [
    pytest.mark.slow,  # starts the real server
    pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (.ci/run installs it)"),
]

IMAGE = encode(scene(7), "JPEG")


@pytest.fixture
def nginx(server, nginx_prefix):
    with NginxServer([server.url], nginx_prefix) as running:
        yield running


def test_caption_through_nginx(nginx, reference):
    response = httpx.post(
        f"{nginx.url}/caption", files={"file": ("p.jpg", IMAGE)}, headers={"X-Request-ID": "via-nginx-1"}, timeout=60
    )
    assert response.status_code == 200
    assert response.json() == {"caption": reference.caption(IMAGE)}
    assert response.headers["x-request-id"] == "via-nginx-1"  # passed through to the bento and back
    assert response.headers["server"] == "nginx"  # server_tokens off: no version
    log = nginx.log_text()
    assert re.search(r'"POST /caption HTTP/1.1" 200 .* id=via-nginx-1 request_time=[\d.]+ upstream=127.0.0.1:\d+', log)


def test_health_and_metrics_through_nginx(nginx):
    assert httpx.get(f"{nginx.url}/readyz").status_code == 200
    assert "blip_batch_size" in httpx.get(f"{nginx.url}/metrics").text


def test_bento_errors_pass_through_as_json(nginx):
    response = httpx.post(f"{nginx.url}/caption", files={"file": ("a.txt", b"not an image")})
    assert response.status_code == 415
    assert "not a supported image" in response.json()["error"]


def test_11_mb_upload_is_refused_by_nginx_as_json(nginx):
    response = httpx.post(f"{nginx.url}/caption", files={"file": ("big.jpg", b"\0" * (11 * 1024 * 1024))}, timeout=60)
    assert response.status_code == 413
    assert response.json() == {"error": "the request body is larger than 10 MB"}
    assert "nginx/" not in response.text


def test_captions_through_nginx_with_its_own_body_limit(nginx, reference):
    images = [encode(scene(40 + i), "PNG") for i in range(3)]
    response = httpx.post(
        f"{nginx.url}/captions", files=[("file", (f"{i}.png", d)) for i, d in enumerate(images)], timeout=60
    )
    assert [c["caption"] for c in response.json()["captions"]] == [reference.caption(d) for d in images]
    parts = [("file", (f"{i}.bin", b"\0" * (9 * 1024 * 1024))) for i in range(8)]  # 72 MB
    too_big = httpx.post(f"{nginx.url}/captions", files=parts, timeout=60)
    assert too_big.status_code == 413
    assert too_big.json() == {"error": "the request body is larger than 64 MB"}


def test_concurrent_requests_through_nginx_still_batch(nginx, server, reference):
    from support.clients import batch_histogram

    images = [encode(scene(300 + i), "JPEG") for i in range(16)]
    before = batch_histogram(server)

    answers = post_concurrently(f"{nginx.url}/caption", images)
    assert [a.body for a in answers] == [{"caption": reference.caption(d)} for d in images]
    after = batch_histogram(server)
    batches = after["le=+Inf"] - before.get("le=+Inf", 0)
    assert batches < len(images), "16 concurrent requests through nginx should share batches"


def test_no_bento_behind_nginx_is_a_json_502(nginx_prefix):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proxy = NginxServer([dead], nginx_prefix).start(ready=None)
    try:
        response = httpx.post(f"{proxy.url}/caption", files={"file": ("p.jpg", IMAGE)})
        assert response.status_code == 502
        assert response.json() == {"error": "no captioning server is reachable; retry shortly"}
        assert response.headers["retry-after"] == "5"
        assert httpx.get(f"{proxy.url}/readyz").status_code == 502
    finally:
        proxy.stop()


NGINX_OWN_ERRORS = {
    # what a client sends: (status, words of the JSON error)
    b"GARBAGE\r\n\r\n": (400, "not valid HTTP/1.1"),
    b"GET /readyz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n": (400, "not valid HTTP/1.1"),
    b"GET /readyz HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 20000 + b"\r\n\r\n": (400, "headers are larger than 8 KB"),
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: a\r\n\r\n": (414, "URL is longer than 8 KB"),
    b"TRACE /caption HTTP/1.1\r\nHost: a\r\n\r\n": (405, "method not allowed"),
    b"POST /caption HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n": (501, "Transfer-Encoding"),
    b"GET /readyz HTTP/2.0\r\nHost: a\r\n\r\n": (505, "HTTP/1.0 and HTTP/1.1"),
    b"GET /_nginx_errors/400 HTTP/1.1\r\nHost: a\r\n\r\n": (404, "no such path"),  # internal only
    b"POST /captions HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n": (502, "no captioning server"),
}


def test_nginxs_own_errors_are_json(nginx_prefix):
    """Before: nginx's 400, 405, 414, 501 and 505 were HTML pages, and /captions' own 502 too."""
    import json
    import socket

    dead = f"http://127.0.0.1:{free_port()}"  # no bento: every answer is nginx's own
    proxy = NginxServer([dead], nginx_prefix).start(ready=None)
    try:
        for raw, (status, words) in NGINX_OWN_ERRORS.items():
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as connection:
                connection.sendall(raw.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
                answer = b""
                while chunk := connection.recv(65536):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(f"HTTP/1.1 {status} ".encode()), (raw[:60], head)
            assert b"content-type: application/json" in head.lower(), (raw[:60], head)
            assert words in json.loads(body)["error"], (raw[:60], body)
    finally:
        proxy.stop()


def test_two_replicas_both_get_traffic(tiny_model_dir, tmp_path, nginx_prefix):
    env = {"BLIP_MODEL": tiny_model_dir}
    with bento_server(env, tmp_path / "a.log") as first, bento_server(env, tmp_path / "b.log") as second:
        with NginxServer([first.url, second.url], nginx_prefix) as proxy:
            answers = post_concurrently(f"{proxy.url}/caption", [IMAGE] * 20)
            assert [a.status for a in answers] == [200] * 20
            upstreams = []
            for _ in range(50):  # nginx writes the access line just after the response
                upstreams = re.findall(r'"POST /caption HTTP/1.1" 200 .* upstream=(\S+)', proxy.log_text())
                if len(upstreams) == 20:
                    break
                time.sleep(0.1)
    assert len(upstreams) == 20
    assert set(upstreams) == {first.url.removeprefix("http://"), second.url.removeprefix("http://")}


def test_the_openai_routes_through_nginx_with_their_body_limit(nginx, server):
    import base64

    model = httpx.get(f"{nginx.url}/v1/models").json()["data"][0]["id"]
    # A 10 MB image in base64 is 13.4 MB of JSON: more than /caption's 10 MB, within this route's 15.
    body = {
        "model": model,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,"}}]}
        ],
    }
    data_url = "data:image/jpeg;base64," + base64.b64encode(IMAGE).decode()
    body["messages"][0]["content"][0]["image_url"]["url"] = data_url
    answer = httpx.post(f"{nginx.url}/v1/chat/completions", json=body, timeout=60)
    direct = httpx.post(f"{server.url}/caption", files={"file": ("p.jpg", IMAGE)}, timeout=60)
    assert answer.json()["choices"][0]["message"]["content"] == direct.json()["caption"]
    padded = httpx.post(
        f"{nginx.url}/v1/chat/completions",
        content=b"{" + b" " * (13 * 1024 * 1024) + b"}",
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert padded.status_code == 400  # through nginx to the server: 13 MB is within the route's limit
    wrong = httpx.post(f"{nginx.url}/v1/chat/completion", json={})
    assert wrong.status_code == 404 and wrong.json()["error"]["type"] == "not_found_error"
    assert (
        wrong.json()["error"]["message"]
        == httpx.post(f"{server.url}/v1/chat/completion", json={}).json()["error"]["message"]
    )
    too_big = httpx.post(
        f"{nginx.url}/v1/chat/completions",
        content=b" " * (16 * 1024 * 1024),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert too_big.status_code == 413
    assert too_big.json()["error"] == {
        "message": "the request body is larger than 15 MB",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
