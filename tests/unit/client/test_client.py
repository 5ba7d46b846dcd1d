"""blip_serve/client/ in-process and as a command: the retry rules against an httpx MockTransport
that plays an overloaded server, the resume and sidecar plans, and blip-caption against a closed
port and servers that misbehave (a fake one, in a thread)."""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import sys
import time

import httpx
import pytest

from blip_serve.client.cli import ResultFile, Stop, plan_sidecars
from blip_serve.client.library import AsyncBlipClient, BlipClient, BlipError
from support import virtual_time
from support.cli import GIB, make_folder, records, run_cli, run_cli_here
from tools.servers import REPO, free_port


def scripted(*answers: tuple[int, dict, dict]) -> tuple[httpx.MockTransport, list[float]]:
    """A transport answering (status, headers, body) in turn; it records when each request came."""
    queue, seen = list(answers), []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(asyncio.get_running_loop().time())  # virtual time: the client's waits take none
        status, headers, body = queue.pop(0)
        return httpx.Response(status, headers=headers, json=body)

    return httpx.MockTransport(handle), seen


def caption_with(transport, **settings) -> str:
    async def run() -> str:
        async with AsyncBlipClient("http://blip", transport=transport, **settings) as client:
            return await client.caption(b"image bytes")

    return virtual_time.run(run())


def test_a_503_is_retried_after_its_retry_after_then_succeeds():
    transport, seen = scripted(
        (503, {"Retry-After": "1"}, {"error": "the server is at capacity; retry shortly"}),
        (503, {"Retry-After": "1"}, {"error": "the server is at capacity; retry shortly"}),
        (200, {}, {"caption": "a dog"}),
    )
    assert caption_with(transport) == "a dog"
    assert len(seen) == 3 and seen[1] - seen[0] >= 0.95 and seen[2] - seen[1] >= 0.95


def test_a_4xx_is_raised_at_once_with_the_servers_message():
    transport, seen = scripted((415, {}, {"error": "the file is not a supported image: send JPEG"}))
    with pytest.raises(BlipError) as raised:
        caption_with(transport)
    assert (raised.value.status, raised.value.message) == (415, "the file is not a supported image: send JPEG")
    assert len(seen) == 1


def test_the_client_imports_neither_torch_nor_bentoml():
    code = "import sys, blip_serve.client; print(sorted({'torch', 'bentoml', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_retries_are_bounded():
    transport, seen = scripted(*[(502, {"Retry-After": "0"}, {"error": "no captioning server is reachable"})] * 3)
    with pytest.raises(BlipError, match="502: no captioning server is reachable"):
        caption_with(transport, retries=2)
    assert len(seen) == 3


def test_the_sync_client_works_inside_a_running_event_loop():
    """As in a Jupyter cell, where asyncio.run() would fail."""
    transport, _ = scripted((200, {}, {"caption": "a cat"}))

    async def cell() -> str:
        return BlipClient("http://blip", transport=transport).caption(b"image bytes")

    assert asyncio.run(cell()) == "a cat"


def test_resume_keeps_captions_and_refusals_and_retries_the_rest(tmp_path):
    out = tmp_path / "captions.jsonl"
    lines = [
        {"path": "a.jpg", "caption": "a dog"},
        {"path": "empty.jpg", "caption": ""},  # the model may stop at once: a real answer
        {"path": "notes.jpg", "error": "not an image", "status": 415},
        {"path": "busy.jpg", "error": "at capacity", "status": 503},
        {"path": "slow.jpg", "error": "too slow", "status": 408},
    ]
    out.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"path": "torn.jpg", "capt')
    assert ResultFile(out).already_done() == {"a.jpg", "empty.jpg", "notes.jpg"}
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == ["a.jpg", "empty.jpg", "notes.jpg"]


def test_sidecar_plan_refuses_clashes_and_files_it_did_not_write(tmp_path):
    for name in ("dup.jpg", "dup.png", "keep.jpg", "new.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "keep.txt").write_text("written by hand")
    images = sorted(tmp_path.glob("*.*g"))
    with pytest.raises(Stop, match=r"1 sidecar name\(s\) would be written twice .*dup.jpg and .*dup.png"):
        plan_sidecars(images, resume=False, overwrite=False)
    images = [p for p in images if p.name != "dup.png"]
    with pytest.raises(Stop, match=r"1 sidecar file\(s\) exist already, e.g. .*keep.txt: --resume skips"):
        plan_sidecars(images, resume=False, overwrite=False)
    todo, kept = plan_sidecars(images, resume=True, overwrite=False)
    assert [p.name for p in todo] == ["dup.jpg", "new.jpg"] and [p.name for p in kept] == ["keep.jpg"]
    assert plan_sidecars(images, resume=False, overwrite=True) == (images, [])


def test_a_path_that_is_not_there_is_refused_before_any_request(tmp_path):
    """Before: exit 0 with "nothing to do"."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"not read")
    result = run_cli_here(f"http://127.0.0.1:{free_port()}", str(tmp_path / "photos"), str(tmp_path / "nosuchdir"))
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"blip-caption: error: no such file or folder: {tmp_path / 'nosuchdir'}")


def test_the_sidecars_of_an_earlier_run_are_not_skipped_files(tmp_path):
    from blip_serve.client.cli import find_images

    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "a.txt").write_text("a caption")  # a.jpg's sidecar
    (tmp_path / "notes.txt").write_text("mine")
    assert find_images([tmp_path]) == ([tmp_path / "a.jpg"], [tmp_path / "notes.txt"])


def test_a_closed_port_fails_at_once_and_says_why(tmp_path):
    make_folder(tmp_path / "photos", count=3, bad=0)
    started = time.monotonic()
    result = run_cli_here(
        f"http://127.0.0.1:{free_port()}", str(tmp_path / "photos"), "--out", str(tmp_path / "o.jsonl")
    )
    assert result.returncode == 2 and time.monotonic() - started < 30
    assert "blip-caption: cannot reach http://127.0.0.1:" in result.stderr and "connection refused" in result.stderr
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""


@functools.cache
def gzip_bomb() -> bytes:
    """64 MB of spaces (8 times what the client reads) in ~64 KB, made once, before the client's clock starts."""
    import gzip

    return gzip.compress(b" " * (64 << 20), 1)


@pytest.fixture
def fake_server():
    """Not a blip-serve: GET /readyz answers 200 (404 with `ready` False); POST answers as `mode`
    says: "401" (the default), or one of MISBEHAVIOURS."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send(200 if self.path == "/readyz" and server.ready else 404, b'{"status": "ok"}')

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            first = {"filename": "a", "caption": "a caption"}
            mode = server.mode
            if mode == "401":
                self.send(401, json.dumps({"error": "missing or wrong API key"}).encode())
            elif mode == "short list":
                self.send(200, json.dumps({"captions": [first]}).encode())
            elif mode == "html":
                self.send(200, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")
            elif mode == "wrong shape":
                self.send(200, json.dumps({"captions": {"a": "b"}}).encode())
            elif mode == "caption not a string":
                self.send(200, json.dumps({"captions": [{"filename": "a", "caption": 5}] * 3}).encode())
            elif mode == "drip":
                self.send_response(200)
                self.send_header("content-length", "1000")
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.5)
            elif mode == "1 GiB":
                self.send_response(200)
                self.send_header("content-length", str(1 << 30))
                self.end_headers()
                chunk = b"[" * (1 << 20)
                for _ in range(1024):
                    self.wfile.write(chunk)
            elif mode == "gzip bomb":
                self.send(200, gzip_bomb(), encoding="gzip")

        def send(self, status, body, content_type="application/json", encoding=None):
            self.send_response(status)
            self.send_header("content-type", content_type)
            if encoding:
                self.send_header("content-encoding", encoding)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.mode, server.ready = "401", True
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield server
    server.shutdown()


MISBEHAVIOURS = {
    # mode: (images captioned of 3, words in each failure)
    "short list": (1, "no result for this image"),
    "html": (0, "not blip-serve's JSON: <html><body><h1>502 Bad Gateway"),
    "wrong shape": (0, 'no "captions" list'),
    "caption not a string": (0, "not blip-serve's shape"),
    "drip": (0, "no complete answer within 0.5 s"),
    "1 GiB": (0, "answer is over 8 MB"),
    "gzip bomb": (0, "compressed answer"),
}


@pytest.mark.parametrize("mode", MISBEHAVIOURS)
def test_blip_caption_trusts_no_answer(fake_server, tmp_path, mode):
    """Every image ends in the output with a caption or an error, the run ends in bounded time and
    memory, and the exit status says that images failed; never a traceback."""
    fake_server.mode = mode
    if mode == "gzip bomb":
        gzip_bomb()  # made before the client's clock starts
    captioned, words = MISBEHAVIOURS[mode]
    make_folder(tmp_path / "photos", count=3, bad=0)
    out = tmp_path / "o.jsonl"
    started = time.monotonic()
    timeout = "0.5" if mode == "drip" else "3"  # the drip never ends: the timeout is the whole wait
    args = (str(tmp_path / "photos"), "--out", str(out), "--timeout", timeout)
    if mode in ("1 GiB", "gzip bomb"):  # its memory is the point: capped, in a process of its own
        result = run_cli(fake_server.url, *args, memory_limit=GIB)
    else:
        result = run_cli_here(fake_server.url, *args)
    took = time.monotonic() - started
    rows = records(out)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert len(rows) == 3 and len({row["path"] for row in rows}) == 3
    assert sum("caption" in row for row in rows) == captioned
    assert all(words in row["error"] for row in rows if "caption" not in row), rows
    assert took < 30


def test_a_missing_api_key_stops_the_run_with_one_line(fake_server, tmp_path):
    make_folder(tmp_path / "photos", count=20, bad=0)
    result = run_cli_here(fake_server.url, str(tmp_path / "photos"), "--out", str(tmp_path / "o.jsonl"))
    assert result.returncode == 2, result.stderr
    assert "blip-caption: the server wants an API key: --api-key KEY or BLIP_API_KEY" in result.stderr
    assert (tmp_path / "o.jsonl").read_text() == ""  # no image is blamed for the missing key


def test_a_url_that_is_not_blip_serve_says_so(fake_server, tmp_path):
    fake_server.ready = False
    make_folder(tmp_path / "photos", count=3, bad=0)
    result = run_cli_here(fake_server.url, str(tmp_path / "photos"))
    assert result.returncode == 2
    assert "does not look like a blip-serve server: GET /readyz answered 404" in result.stderr
