"""The API's HTTP plumbing in-process, no server: RequestGuard and RequestLog driven through a
synthetic ASGI receive/send, the validation messages, and the error rendering."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from fastapi import FastAPI, Request

from blip_serve.api.http import RequestGuard, RequestLog, install_error_handlers, log_fields
from blip_serve.shared.errors import Unavailable


def echo_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        log_fields(request)["size"] = len(await request.body())
        return {"bytes": len(await request.body())}

    @app.post("/slow")
    async def slow() -> dict:
        await asyncio.sleep(5)
        return {}

    @app.post("/busy")
    async def busy() -> dict:
        raise Unavailable("the server is at capacity; retry shortly")

    return app


def call(
    app,
    path: str,
    chunks: list[bytes],
    *,
    gap_s: float = 0.0,
    headers: list | None = None,
    hang_up_after_s: float | None = None,
) -> tuple[int, dict, dict]:
    """Send `chunks` as the body (each after `gap_s`), return (status, headers, JSON body); with
    `hang_up_after_s`, the client disconnects that long after its body (then: status None)."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers or [],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("t", 80),
        "client": ("c", 1),
        "root_path": "",
    }
    sent: list[dict] = []

    async def run() -> None:
        pending = list(chunks)

        async def receive() -> dict:
            if not pending:
                if hang_up_after_s is not None:
                    await asyncio.sleep(hang_up_after_s)
                    return {"type": "http.disconnect"}
                await asyncio.sleep(3600)  # a client that went silent
            await asyncio.sleep(gap_s)
            body = pending.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(pending)}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)

    asyncio.run(run())
    if not sent:
        return None, {}, {}
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body)


def guarded(max_bytes=1000, body_timeout_s=5.0, request_timeout_s=10.0, max_reading_bytes=10_000, app=None):
    return RequestGuard(
        app or echo_app(),
        max_bytes=max_bytes,
        body_timeout_s=body_timeout_s,
        request_timeout_s=request_timeout_s,
        max_reading_bytes=max_reading_bytes,
    )


def test_a_body_within_the_limits_passes():
    assert call(guarded(), "/echo", [b"a" * 400, b"b" * 400])[0::2] == (200, {"bytes": 800})


def test_a_declared_length_over_the_limit_is_413_before_reading():
    status, _, body = call(guarded(), "/echo", [], headers=[(b"content-length", b"5000")])
    assert (status, body) == (413, {"error": "the request body is larger than 0.000953674 MB"})


def test_an_undeclared_body_over_the_limit_is_413_as_it_arrives():
    status, _, body = call(guarded(), "/echo", [b"a" * 600, b"b" * 600, b"never read"])
    assert status == 413 and body["error"].startswith("the request body is larger than")


def test_a_trickled_body_is_408_within_the_body_timeout():
    status, _, body = call(guarded(body_timeout_s=0.3), "/echo", [b"a"] * 10, gap_s=0.1)
    assert (status, body) == (408, {"error": "the request body did not arrive within 0.3 s; send it faster or smaller"})


def test_a_stalled_body_is_408():
    status, _, _ = call(guarded(body_timeout_s=0.2), "/echo", [])  # headers, then silence
    assert status == 408


def test_a_request_over_the_time_limit_is_a_json_504():
    status, _, body = call(guarded(request_timeout_s=0.2), "/slow", [b""])
    assert (status, body) == (504, {"error": "no caption within 0.2 s; retry later"})


def test_service_errors_keep_their_status_and_headers():
    status, headers, body = call(guarded(), "/busy", [b""])
    assert (status, headers["retry-after"], body) == (503, "5", {"error": "the server is at capacity; retry shortly"})


def test_request_log_adds_the_id_and_logs_the_status_sent(caplog):
    app = RequestLog(guarded(body_timeout_s=0.2))
    with caplog.at_level(logging.INFO, logger="bentoml.blip_serve"):
        status, headers, _ = call(app, "/echo", [], headers=[(b"x-request-id", b"abc-1\x07")])
        ok_status, ok_headers, _ = call(app, "/echo", [b"xyz"])
    assert status == 408 and headers["x-request-id"] == "abc-1_"  # outside [A-Za-z0-9._:-]: replaced
    assert len(ok_headers["x-request-id"]) == 32
    lines = [r.getMessage() for r in caplog.records]
    assert any("request_id=abc-1_ method=POST path=/echo status=408" in line for line in lines)
    assert any("status=200" in line and line.endswith("size=3") for line in lines)


@pytest.mark.parametrize(
    "sent, kept",
    [
        ("abc status=200 path=/admin", "abc_status_200_path__admin"),  # would forge two log fields
        ("a\r\nfake: line", "a__fake:_line"),
        ("ok-id_1.2:3", "ok-id_1.2:3"),
        ("x" * 500, "x" * 128),
    ],
)
def test_a_request_id_cannot_forge_log_fields_or_headers(caplog, sent, kept):
    app = RequestLog(guarded())
    with caplog.at_level(logging.INFO, logger="bentoml.blip_serve"):
        _, headers, _ = call(app, "/echo", [b"xyz"], headers=[(b"x-request-id", sent.encode("latin-1"))])
    assert headers["x-request-id"] == kept
    [line] = [r.getMessage() for r in caplog.records if "request_id=" in r.getMessage()]
    assert line.startswith(f"request_id={kept} method=POST path=/echo status=200 ")


def test_a_client_that_hangs_up_cancels_its_request():
    cancelled = []
    app = echo_app()

    @app.post("/wait")
    async def wait(request: Request) -> dict:
        await request.body()
        try:
            await asyncio.sleep(5)  # as a call to the model would
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return {}

    status, _, body = call(guarded(app=app), "/wait", [b"x"], hang_up_after_s=0.1)
    # Ended for every layer above (BentoML's traffic timeout waited for an answer otherwise).
    assert (status, cancelled) == (499, [True])
    assert body == {"error": "the client closed the connection before the answer"}


def test_a_client_that_hangs_up_mid_body_ends_its_request_as_499():
    """Not Starlette's ClientDisconnect, which reached the server as an exception (a 500)."""
    guard, sent = guarded(), []
    messages = [{"type": "http.request", "body": b"a" * 10, "more_body": True}, {"type": "http.disconnect"}]
    scope = {"type": "http", "method": "POST", "path": "/echo", "raw_path": b"/echo", "query_string": b"",
             "headers": [(b"content-length", b"500")], "http_version": "1.1", "scheme": "http",
             "server": ("t", 80), "client": ("c", 1), "root_path": ""}  # fmt: skip

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    assert sent[0]["status"] == 499 and guard.reading_bytes == 0


def two_requests(guard: RequestGuard, first: tuple[int, list[bytes]], second: tuple[int | None, list[bytes]]):
    """The first request (declared length, chunks) sends its chunks and then stalls, a slow client;
    meanwhile the second sends all of its body (a length of None: sent chunked). Returns the
    second's status and the budget held before it began."""
    held = []

    def scope(length: int | None) -> dict:
        header = (b"content-length", str(length).encode()) if length is not None else (b"transfer-encoding", b"chunked")
        return {"type": "http", "method": "POST", "path": "/echo", "raw_path": b"/echo", "query_string": b"",
                "headers": [header], "http_version": "1.1", "scheme": "http", "server": ("t", 80),
                "client": ("c", 1), "root_path": ""}  # fmt: skip

    async def run():
        stalled, pending, sent = list(first[1]), list(second[1]), []

        async def slow_receive():
            if stalled:
                return {"type": "http.request", "body": stalled.pop(0), "more_body": True}
            await asyncio.sleep(3600)

        async def receive():
            body = pending.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(pending)}

        async def send(message):
            sent.append(message)

        slow = asyncio.ensure_future(guard(scope(first[0]), slow_receive, lambda message: asyncio.sleep(0)))
        await asyncio.sleep(0.05)
        held.append(guard.reading_bytes)
        await guard(scope(second[0]), receive, send)
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
        return next(m["status"] for m in sent if m["type"] == "http.response.start")

    return asyncio.run(run()), held[0]


def test_a_slow_client_holds_only_the_bytes_it_sent_of_the_reading_budget():
    """Before: a body's declared length was held for as long as it trickled in; four sockets
    declaring 64 MB and sending a byte every 4 s got every small upload a 503."""
    guard = guarded(max_bytes=1000, max_reading_bytes=1500)
    assert two_requests(guard, (1000, [b"a" * 10]), (800, [b"b" * 800])) == (200, 10)
    assert guard.reading_bytes == 0  # both gave back what they held


def test_bytes_past_the_reading_budget_are_503_as_they_arrive():
    guard = guarded(max_bytes=1000, max_reading_bytes=1500)
    assert two_requests(guard, (1000, [b"a" * 900]), (800, [b"b" * 800])) == (503, 900)  # declared: at once
    assert two_requests(guard, (1000, [b"a" * 900]), (None, [b"b" * 400, b"b" * 300])) == (503, 900)  # chunked
    assert two_requests(guard, (1000, [b"a" * 900]), (None, [b"b" * 400, b"b" * 100])) == (200, 900)
    assert guard.reading_bytes == 0


def test_a_request_past_the_reading_budget_is_503_at_once_and_the_budget_comes_back():
    guard = guarded(max_reading_bytes=1500)
    guard.reading_bytes = 1000  # another request holds 1000 bytes
    status, headers, body = call(guard, "/echo", [b"a" * 800], headers=[(b"content-length", b"800")])
    assert (status, headers["retry-after"]) == (503, "1")
    assert body == {"error": "the server is busy reading other uploads; retry shortly"}
    guard.reading_bytes = 0
    assert call(guard, "/echo", [b"a" * 800], headers=[(b"content-length", b"800")])[0] == 200
    assert guard.reading_bytes == 0  # released when the request ended
