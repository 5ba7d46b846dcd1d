"""HTTP plumbing of the API service: errors rendered in one place, what a request may cost (body
size, body time, total time), and one access-log line per request with its X-Request-ID."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blip_serve.host.disconnect import wait_for_disconnect
from blip_serve.shared.errors import ServiceError, error_body
from blip_serve.shared.routes import NOT_FOUND, OPENAI_NOT_FOUND

logger = logging.getLogger("bentoml.blip_serve")  # under "bentoml": BentoML's log handlers and format

QUIET_PATHS = ("/readyz", "/livez", "/healthz", "/metrics")  # probes and scrapes: not logged


def error_response(
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    scope: Scope | None = None,
    param: str | None = None,
) -> JSONResponse:
    """error_body as a response to the request of `scope`."""
    path = scope.get("path", "") if scope is not None else ""
    return JSONResponse(error_body(status, message, path, param), status_code=status, headers=headers)


def too_large(max_bytes: int) -> str:
    """The 413 for a body over `max_bytes` (nginx says the same, in whole megabytes)."""
    return f"the request body is larger than {max_bytes / 1024 / 1024:g} MB"


def method_not_allowed(scope: Scope, allowed: str) -> str:
    return f"{scope.get('method')} is not allowed on {scope.get('path', '')[:200]}; use {allowed or 'another method'}"


def plain_error_message(scope: Scope, status: int, headers: dict[bytes, bytes]) -> str:
    if status == 404:
        return OPENAI_NOT_FOUND if scope.get("path", "").startswith("/v1/") else NOT_FOUND
    if status == 405:
        allowed = headers.get(b"allow", b"").decode("latin-1")
        return method_not_allowed(scope, ", ".join(sorted(m.strip() for m in allowed.split(",") if m.strip())))
    return HTTPStatus(status).phrase


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as {"error": "..."}: one place, one shape."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.headers, request.scope, exc.param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None) or {}
        if exc.status_code in (404, 405):
            allow = {k.lower().encode(): v.encode() for k, v in headers.items()}
            message = plain_error_message(request.scope, exc.status_code, allow)
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, headers, request.scope)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error for request %s", request.scope.get("state", {}).get("request_id", "-"))
        return error_response(
            500, "internal error: the server failed to caption this image; see its log", scope=request.scope
        )


BUSY_READING = "the server is busy reading other uploads; retry shortly"
BUSY_HEADERS = {"Retry-After": "1"}
READING_GUARD = "reading_guard"  # the request state key of the RequestGuard that admitted it


def reading_more(request: Request, nbytes: int):
    """RequestGuard.reading_more for this request (a no-op where no guard admitted it)."""
    guard = request.scope.get("state", {}).get(READING_GUARD)
    return guard.reading_more(nbytes) if guard is not None else contextlib.nullcontext()


CUT_OFF = "the multipart body ended before its closing boundary: the upload was cut off; send the whole request"


class RequestGuard:
    """What one request may hold: a body of at most `max_bytes` (or `path_max_bytes[path]`; 413,
    whether or not it declared its length, before the whole body is buffered), all of it within
    `body_timeout_s` (408), and an answer within `request_timeout_s` (504). The bodies one API worker
    reads and decodes at once add up to `max_reading_bytes` at most, counted by the bytes received
    (a slow client that declared a large body holds only what it sent): a request whose declared
    length would go past it gets 503 at once, and one whose bytes go past it as they arrive gets
    503 then (a busy server is not the client's fault). A client that hangs up cancels its request, and
    so its call to the model. Each error is JSON and goes through the request log.

    In three steps, one owner each: `admit` (what the headers declare, and the worker's reading
    budget), a GuardedRequest (the body as it streams in, and what the app may still send), and
    `answer_in_time` (the deadline, and the client's hang-up)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        body_timeout_s: float,
        request_timeout_s: float,
        max_reading_bytes: int,
        path_max_bytes: dict[str, int] | None = None,
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.path_max_bytes = path_max_bytes or {}
        self.body_timeout_s = body_timeout_s
        self.request_timeout_s = request_timeout_s
        self.max_reading_bytes = max_reading_bytes
        self.reading_bytes = 0  # bytes of body received by the requests in this process now, and fetched images

    def limit_for(self, path: str) -> int:
        """The largest body a request to `path` may send (shared/routes.py's limits)."""
        return self.path_max_bytes.get(path, self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.limit_for(scope.get("path", ""))
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        declared_bytes = int(declared) if declared is not None and declared.isdigit() else None
        if declared_bytes is None and b"transfer-encoding" not in headers:
            declared_bytes = 0  # HTTP/1.1: a request with neither header has no body (a GET)
        refusal = self.admit(scope, max_bytes, declared_bytes)
        if refusal is not None:
            return await refusal(scope, receive, send)
        scope.setdefault("state", {})[READING_GUARD] = self
        request = GuardedRequest(scope, receive, send, max_bytes, self.body_timeout_s, self)
        try:
            await self.answer_in_time(scope, receive, send, request)
        finally:
            self.reading_bytes -= request.received  # the body's bytes stay counted until the answer

    def count_received(self, nbytes: int, request_holds: int) -> bool:
        """Count `nbytes` of a body that just arrived; False when they take this worker past its
        budget while other requests hold part of it (a request alone is bounded by its own limit)."""
        self.reading_bytes += nbytes
        return self.reading_bytes <= self.max_reading_bytes or self.reading_bytes <= request_holds

    @contextlib.contextmanager
    def reading_more(self, nbytes: int):
        """`nbytes` more of the reading budget for the request in hand (an image it fetches), until
        the block ends; a 503 at once when that would go past the budget."""
        if self.reading_bytes + nbytes > self.max_reading_bytes:
            raise ServiceError(BUSY_READING, headers=BUSY_HEADERS, status_code=503)
        self.reading_bytes += nbytes
        try:
            yield
        finally:
            self.reading_bytes -= nbytes

    def admit(self, scope: Scope, max_bytes: int, declared_bytes: int | None) -> JSONResponse | None:
        """A 413 for a declared length over the limit, a 503 when the bytes this worker holds and
        this body would go past its budget; None: read the body."""
        if declared_bytes is not None and declared_bytes > max_bytes:
            return error_response(413, too_large(max_bytes), scope=scope)
        if self.reading_bytes and self.reading_bytes + (declared_bytes or 0) > self.max_reading_bytes:
            return error_response(503, BUSY_READING, BUSY_HEADERS, scope)
        return None

    async def answer_in_time(self, scope: Scope, receive: Receive, send: Send, request: GuardedRequest) -> None:
        """Run the app on the guarded request: a 504 if it has not started answering within
        request_timeout_s, nothing more once the client has hung up, the body's refusal if it
        broke a limit."""
        work = asyncio.ensure_future(self.app(scope, request.receive, request.send))
        request.on_hang_up = work.cancel
        try:
            await asyncio.wait_for(work, self.request_timeout_s)
        except HungUpMidBody:
            await client_gone(scope, receive, send)
            return
        except BodyRefused:
            pass
        except TimeoutError:
            if not request.started:
                timed_out = f"no caption within {self.request_timeout_s:g} s; retry later"
                await error_response(504, timed_out, scope=scope)(scope, receive, send)
            return
        except asyncio.CancelledError:
            if not request.hung_up():
                raise  # cancelled from outside, not by the client's hang-up
            if not request.started:
                await client_gone(scope, receive, send)
            return
        finally:
            work.cancel()
            request.close()
        if request.refusal is not None and not request.started:
            await request.refusal(scope, receive, send)


CLIENT_CLOSED = 499  # nginx's status for a request whose client went away


async def client_gone(scope: Scope, receive: Receive, send: Send) -> None:
    """Close a request whose client hung up with nginx's 499 (client closed request): nobody reads
    it, but every layer above sees the request end. BentoML's traffic timeout otherwise waits for an
    answer that never comes: the request stayed in progress on /metrics (what KEDA scales on) for
    the whole timeout."""
    await error_response(CLIENT_CLOSED, "the client closed the connection before the answer", scope=scope)(
        scope, receive, send
    )


class GuardedRequest:
    """One request's exchange as the app sees it: `receive` refuses a body over `max_bytes` (413)
    or late past `body_timeout_s` (408), notes whether a multipart body ended with its closing
    boundary (`multipart_complete`, read by uploads.py through `multipart_complete(request)`), and
    once the body is in watches for the client's hang-up; `send` drops what the app answers after
    a refusal, which replaces it."""

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        max_bytes: int,
        body_timeout_s: float,
        guard: RequestGuard | None = None,
    ):
        self.guard = guard  # counts the bytes received in its worker's reading budget
        self.scope = scope
        self.upstream_receive = receive
        self.upstream_send = send
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s
        self.deadline = time.monotonic() + body_timeout_s
        self.received = 0
        self.closing = multipart_closing(scope)  # b"--boundary--" of a multipart body, or None
        self.tail = b""
        self.multipart_complete: bool | None = None  # known once a multipart body has ended
        self.refusal: JSONResponse | None = None  # set once the body broke a limit
        self.started = self.answered = self.gone = False
        self.hang_up: asyncio.Task | None = None  # reads `receive` once the body is in: a disconnect
        self.on_hang_up: Callable[[], object] = lambda: None
        scope.setdefault("state", {})[GUARDED] = self

    async def receive(self) -> Message:
        if self.hang_up is not None:  # later reads only wait for a disconnect
            await asyncio.shield(self.hang_up)
            return {"type": "http.disconnect"}
        try:
            message = await asyncio.wait_for(self.upstream_receive(), max(0.0, self.deadline - time.monotonic()))
        except TimeoutError:
            late = f"the request body did not arrive within {self.body_timeout_s:g} s; send it faster or smaller"
            self.refusal = error_response(408, late, scope=self.scope)
            raise BodyRefused() from None
        if message["type"] == "http.request":
            self.take(message.get("body", b""), done=not message.get("more_body", False))
        elif message["type"] == "http.disconnect":  # hung up before the whole body came: nobody to answer
            self.gone = True
            raise HungUpMidBody()
        return message

    def take(self, chunk: bytes, done: bool) -> None:
        self.received += len(chunk)
        if self.guard is not None and not self.guard.count_received(len(chunk), self.received):
            self.refusal = error_response(503, BUSY_READING, BUSY_HEADERS, self.scope)
            raise BodyRefused()
        if self.closing is not None:  # did the body end with its closing boundary?
            self.tail = (self.tail + chunk)[-(len(self.closing) + 8) :]
            if done:
                self.multipart_complete = self.closing in self.tail
        if self.received > self.max_bytes:
            self.refusal = error_response(413, too_large(self.max_bytes), scope=self.scope)
            raise BodyRefused()
        if done:
            self.hang_up = asyncio.ensure_future(wait_for_disconnect(self.upstream_receive))
            self.hang_up.add_done_callback(lambda _: None if self.answered else self.on_hang_up())

    async def send(self, message: Message) -> None:
        if self.refusal is not None or self.gone:  # the app's answer to a refused body (FastAPI makes it a 400)
            return
        if message["type"] == "http.response.start":
            self.started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.answered = True
        await self.upstream_send(message)

    def hung_up(self) -> bool:
        return self.hang_up is not None and self.hang_up.done() and not self.hang_up.cancelled()

    def close(self) -> None:
        if self.hang_up is not None:
            self.hang_up.cancel()


GUARDED = "guarded_request"  # the request state key of its GuardedRequest


def multipart_complete(request: Request) -> bool | None:
    """Whether the request's multipart body ended with its closing boundary (None: not known, or
    not multipart). Python's multipart parser accepts a body cut off between parts as complete."""
    guarded = request.scope.get("state", {}).get(GUARDED)
    return guarded.multipart_complete if guarded is not None else None


class BodyRefused(Exception):
    pass


class HungUpMidBody(BodyRefused):
    """The client went away while sending its body: the request ends as 499, not as the server's
    error (Starlette's ClientDisconnect would be a 500)."""


def multipart_closing(scope: Scope) -> bytes | None:
    """The closing delimiter (b"--<boundary>--") of a multipart request, or None."""
    content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
    if not content_type.lower().startswith("multipart/"):
        return None
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.strip().partition("=")
        if name.lower() == "boundary" and value:
            return b"--" + value.strip('"').encode("latin-1") + b"--"
    return None


# What a client-chosen value may carry into a log line or a header: no spaces, quotes or "=" that
# would forge a field, no control characters that would forge a line.
UNSAFE_IN_REQUEST_ID = re.compile(r"[^A-Za-z0-9._:-]")
UNSAFE_IN_LOGS = re.compile(r"[^A-Za-z0-9._:~!$&'()*+,;=@/%-]")


def safe_request_id(sent: str) -> str:
    """The client's X-Request-ID with every character outside [A-Za-z0-9._:-] replaced by "_" (at
    most 128 characters), or a new id when none was sent."""
    return UNSAFE_IN_REQUEST_ID.sub("_", sent[:128]) or uuid.uuid4().hex


class RequestLog:
    """One log line per request (id, method, path, status sent, latency, and what the route noted
    with `log_fields`) and an X-Request-ID header on every response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        request_id = safe_request_id(headers.get(b"x-request-id", b"").decode("latin-1"))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["log_fields"] = fields = {}
        started = time.perf_counter()
        status = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode("latin-1")))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if not scope.get("path", "").startswith(QUIET_PATHS) or (status or 500) >= 400:
                extra = "".join(f" {key}={value}" for key, value in fields.items())
                logger.info(
                    "request_id=%s method=%s path=%s status=%s latency_ms=%.1f%s",
                    request_id,
                    scope.get("method"),
                    UNSAFE_IN_LOGS.sub("_", scope.get("path", "")[:200]),
                    status if status is not None else "none(disconnected)",
                    (time.perf_counter() - started) * 1000,
                    extra,
                )


class JsonErrors:
    """Errors that BentoML's own router answers in plain text (an unknown path, a wrong method on
    /readyz ...) leave in the contract's shape too: {"error": "..."} with the same status."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        replacing = False

        async def send_json_errors(message: Message) -> None:
            nonlocal replacing
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if message["status"] >= 400 and not headers.get(b"content-type", b"").startswith(b"application/json"):
                    replacing = True
                    text = plain_error_message(scope, message["status"], headers)
                    kept = {k: v for k, v in headers.items() if k.lower() in (b"allow", b"retry-after")}
                    response = error_response(
                        message["status"], text, {k.decode(): v.decode() for k, v in kept.items()}, scope
                    )
                    await response(scope, receive, send)
                    return
            if not replacing:
                await send(message)

        await self.app(scope, receive, send_json_errors)


def log_fields(request: Request) -> dict:
    """Fields for this request's access-log line: `log_fields(request)["image"] = "640x480"`."""
    return request.scope.setdefault("state", {}).setdefault("log_fields", {})
