"""The client library and the blip-caption command-line tool.

The retry rules run in-process against an httpx MockTransport that plays an overloaded server;
everything else runs against the real server (tiny model)."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from blip_serve.client import AsyncBlipClient, BlipClient, BlipError, ResultFile, Stop, plan_sidecars
from load_test.servers import REPO, BentoServer, free_port
from support.images import encode, scene


def scripted(*answers: tuple[int, dict, dict]) -> tuple[httpx.MockTransport, list[float]]:
    """A transport answering (status, headers, body) in turn; it records when each request came."""
    queue, seen = list(answers), []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(time.monotonic())
        status, headers, body = queue.pop(0)
        return httpx.Response(status, headers=headers, json=body)

    return httpx.MockTransport(handle), seen


def caption_with(transport, **settings) -> str:
    async def run() -> str:
        async with AsyncBlipClient("http://blip", transport=transport, **settings) as client:
            return await client.caption(b"image bytes")

    return asyncio.run(run())


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


slow = pytest.mark.slow  # these start the real server


@slow
def test_library_captions_equal_the_reference(server, reference, tmp_path):
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(encode(scene(800 + i), "PNG"))
    client = BlipClient(server.url)
    assert client.caption(paths[0]) == reference.caption(paths[0].read_bytes())
    outcomes = client.caption_many(paths, concurrency=2, batch=2)
    assert [o.image for o in outcomes] == [str(p) for p in paths]
    assert [o.caption for o in outcomes] == [reference.caption(p.read_bytes()) for p in paths]


def make_folder(root: Path, count: int = 40, bad: int = 4) -> list[Path]:
    """`count` image files in nested folders, `bad` of them not images, plus two files to skip."""
    images = []
    for i in range(count):
        folder = root / f"set{i % 3}" / ("deep" if i % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:02d}.png"
        path.write_bytes(b"not an image at all" if i < bad else encode(scene(900 + i), "PNG"))
        images.append(path)
    (root / "notes.md").write_text("skip me")
    (root / "set1" / "data.csv").write_text("skip,me")
    return images


def blip_caption(url: str, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "blip_serve.client", *args, "--url", url, "--quiet"]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def records(out: Path) -> list[dict]:
    text = out.read_text()
    assert text.endswith("\n"), "a torn last line"
    return [json.loads(line) for line in text.splitlines()]


@slow
def test_cli_captions_a_folder_to_jsonl_and_sidecars(server, reference, tmp_path):
    images = make_folder(tmp_path / "photos")
    out = tmp_path / "captions.jsonl"
    run = blip_caption(server.url, str(tmp_path / "photos"), "--out", str(out), "--sidecar", "--batch", "8")
    _, summary = run.communicate(timeout=300)
    assert run.returncode == 1, summary  # four images failed
    assert "36 captioned, 4 failed (415); 0 already done, 2 skipped (not images)" in summary

    lines = records(out)
    assert sorted(r["path"] for r in lines) == sorted(str(p) for p in images)
    for record in lines:
        path = Path(record["path"])
        if record.get("caption") is None:
            assert record["status"] == 415 and not path.with_suffix(".txt").exists()
        else:
            assert record["caption"] == reference.caption(path.read_bytes())
            assert path.with_suffix(".txt").read_text() == record["caption"] + "\n"


@slow
def test_cli_writes_csv_and_resumes_only_what_failed(server, reference, tmp_path):
    import csv

    images = make_folder(tmp_path / "photos", count=10, bad=2)
    out = tmp_path / "captions.csv"
    first = blip_caption(server.url, str(tmp_path / "photos"), "--out", str(out))
    first.communicate(timeout=120)
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "blip_serve.client",
            str(tmp_path / "photos"),
            "--url",
            server.url,
            "--out",
            str(out),
            "--resume",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "skipped (not an image): " in again.stderr and "notes.md" in again.stderr
    assert "nothing to do; 10 already done, 2 skipped (not images)" in again.stderr  # a 415 stays a 415
    assert again.returncode == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 10  # one row per image: the refused ones are not appended again
    captioned = {row["path"]: row["caption"] for row in rows if row["caption"]}
    assert sorted(captioned) == sorted(str(p) for p in images[2:])
    assert all(caption == reference.caption(Path(path).read_bytes()) for path, caption in captioned.items())


@pytest.fixture
def slow_server(tiny_model_dir, tmp_path):
    env = {"BLIP_MODEL": tiny_model_dir, "BLIP_MAX_NEW_TOKENS": "100", "BLIP_MIN_NEW_TOKENS": "100"}
    with BentoServer(env, tmp_path / "slow.log") as running:
        yield running


@slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_an_interrupted_run_resumes_without_duplicates(slow_server, tmp_path, stop):
    images = make_folder(tmp_path / "photos", bad=0)
    out = tmp_path / "captions.jsonl"
    args = [str(tmp_path / "photos"), "--out", str(out), "--batch", "2", "--concurrency", "1"]
    run = blip_caption(slow_server.url, *args)
    deadline = time.monotonic() + 120
    while (not out.exists() or len(out.read_text().splitlines()) < 6) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(run.pid, stop)
    _, said = run.communicate(timeout=60)
    first = out.read_text()
    if stop == signal.SIGINT:  # Ctrl-C: one line that says how to go on, no traceback
        assert run.returncode == 130 and "Traceback" not in said, said
        [line] = [line for line in said.splitlines() if line.strip()]
        assert line.startswith("interrupted after ") and line.endswith(" --resume"), line
    assert 6 <= first.count("\n") < 40, "the run was stopped midway"

    resumed = blip_caption(slow_server.url, *args, "--resume")
    _, summary = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, summary
    paths = [r["path"] for r in records(out)]
    assert sorted(paths) == sorted(str(p) for p in images) and len(paths) == len(set(paths)) == 40


@slow
def test_a_run_survives_a_server_restart(tiny_model_dir, tmp_path):
    images = make_folder(tmp_path / "photos", bad=0)
    out = tmp_path / "captions.jsonl"
    port = free_port()
    env = {"BLIP_MODEL": tiny_model_dir, "BLIP_MAX_NEW_TOKENS": "100", "BLIP_MIN_NEW_TOKENS": "100"}
    first = BentoServer(env, tmp_path / "first.log", port=port).start()
    args = [str(tmp_path / "photos"), "--out", str(out), "--batch", "2", "--concurrency", "1"]
    run = blip_caption(first.url, *args)
    deadline = time.monotonic() + 120
    try:
        while (not out.exists() or len(out.read_text().splitlines()) < 4) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        first.stop()  # the client retries 502/503/connection errors with backoff meanwhile
    with BentoServer(env, tmp_path / "second.log", port=port):
        _, summary = run.communicate(timeout=300)
    assert run.returncode == 0, summary
    assert sorted(r["path"] for r in records(out)) == sorted(str(p) for p in images)


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


GIB = 1 << 30


def run_cli(url: str, *args: str, memory_limit: int | None = None) -> subprocess.CompletedProcess:
    """blip-caption in a process of its own; with `memory_limit`, its address space is capped (a
    client that read a 1 GiB answer into memory would fail with a MemoryError)."""
    command = [sys.executable, "-m", "blip_serve.client", *args, "--url", url]
    limit = (lambda: resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))) if memory_limit else None
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=limit)


def test_a_closed_port_fails_at_once_and_says_why(tmp_path):
    make_folder(tmp_path / "photos", count=3, bad=0)
    started = time.monotonic()
    result = run_cli(f"http://127.0.0.1:{free_port()}", str(tmp_path / "photos"), "--out", str(tmp_path / "o.jsonl"))
    assert result.returncode == 2 and time.monotonic() - started < 30
    assert "blip-caption: cannot reach http://127.0.0.1:" in result.stderr and "connection refused" in result.stderr
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""


@pytest.fixture
def fake_server():
    """Not a blip-serve: GET /readyz answers 200 (404 with `ready` False); POST answers as `mode`
    says: "401" (the default), or one of MISBEHAVIOURS."""
    import gzip
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
                self.send(200, gzip.compress(b" " * (512 << 20), 9), encoding="gzip")

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
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


MISBEHAVIOURS = {
    # mode: (images captioned of 3, words in each failure)
    "short list": (1, "no result for this image"),
    "html": (0, "not blip-serve's JSON: <html><body><h1>502 Bad Gateway"),
    "wrong shape": (0, 'no "captions" list'),
    "caption not a string": (0, "not blip-serve's shape"),
    "drip": (0, "no complete answer within 3 s"),
    "1 GiB": (0, "answer is over 8 MB"),
    "gzip bomb": (0, "compressed answer"),
}


@pytest.mark.parametrize("mode", MISBEHAVIOURS)
def test_blip_caption_trusts_no_answer(fake_server, tmp_path, mode):
    """Every image ends in the output with a caption or an error, the run ends in bounded time and
    memory, and the exit status says that images failed; never a traceback."""
    fake_server.mode = mode
    captioned, words = MISBEHAVIOURS[mode]
    make_folder(tmp_path / "photos", count=3, bad=0)
    out = tmp_path / "o.jsonl"
    started = time.monotonic()
    result = run_cli(fake_server.url, str(tmp_path / "photos"), "--out", str(out), "--timeout", "3", memory_limit=GIB)
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
    result = run_cli(fake_server.url, str(tmp_path / "photos"), "--out", str(tmp_path / "o.jsonl"))
    assert result.returncode == 2, result.stderr
    assert "blip-caption: the server wants an API key: --api-key KEY or BLIP_API_KEY" in result.stderr
    assert (tmp_path / "o.jsonl").read_text() == ""  # no image is blamed for the missing key


def test_a_url_that_is_not_blip_serve_says_so(fake_server, tmp_path):
    fake_server.ready = False
    make_folder(tmp_path / "photos", count=3, bad=0)
    result = run_cli(fake_server.url, str(tmp_path / "photos"))
    assert result.returncode == 2
    assert "does not look like a blip-serve server: GET /readyz answered 404" in result.stderr


@slow
def test_sidecars_never_overwrite_and_clashes_stop_before_any_request(server, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    image = encode(scene(7), "PNG")
    for name in ("dup.jpg", "dup.png", "keep.jpg", "new.jpg"):
        (folder / name).write_bytes(image)
    (folder / "keep.txt").write_text("written by hand\n")
    clash = run_cli(server.url, str(folder), "--sidecar")
    assert clash.returncode == 2 and "would be written twice" in clash.stderr
    assert sorted(p.name for p in folder.glob("*.txt")) == ["keep.txt"]
    (folder / "dup.png").unlink()
    refused = run_cli(server.url, str(folder), "--sidecar")
    assert refused.returncode == 2 and "exist already" in refused.stderr
    resumed = run_cli(server.url, str(folder), "--sidecar", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (folder / "keep.txt").read_text() == "written by hand\n"
    assert (folder / "new.txt").read_text() and (folder / "dup.txt").read_text()
