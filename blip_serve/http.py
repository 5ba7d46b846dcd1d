"""HTTP plumbing of the API service: errors rendered in one place, what a request may cost (body
size, body time, total time), and one access-log line per request with its X-Request-ID."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable
from http import HTTPStatus
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ServiceError

logger = logging.getLogger("bentoml.blip_serve")  # under "bentoml": BentoML's log handlers and format
T = TypeVar("T")

FIELD_HINTS = {
    "file": "send the image as multipart/form-data field 'file' (e.g. curl -F file=@photo.jpg)",
}
NOT_FOUND = "no such path; the API is POST /caption (see /docs.json)"
OPENAI_NOT_FOUND = "no such path; the OpenAI-compatible routes are POST /v1/chat/completions and GET /v1/models"
QUIET_PATHS = ("/readyz", "/livez", "/healthz", "/metrics")  # probes and scrapes: not logged


OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def openai_error(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    kind = OPENAI_ERROR_TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
    code = "model_not_found" if status == 404 and param == "model" else None
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    scope: Scope | None = None,
    param: str | None = None,
) -> JSONResponse:
    """{"error": message}; on the OpenAI-compatible routes (/v1/...), OpenAI's error shape."""
    if scope is not None and scope.get("path", "").startswith("/v1/"):
        return JSONResponse(openai_error(status, message, param), status_code=status, headers=headers)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def method_not_allowed(scope: Scope, allowed: str) -> str:
    return f"{scope.get('method')} is not allowed on {scope.get('path', '')[:200]}; use {allowed or 'another method'}"


def plain_error_message(scope: Scope, status: int, headers: dict[bytes, bytes]) -> str:
    if status == 404:
        return OPENAI_NOT_FOUND if scope.get("path", "").startswith("/v1/") else NOT_FOUND
    if status == 405:
        allowed = headers.get(b"allow", b"").decode("latin-1")
        return method_not_allowed(scope, ", ".join(sorted(m.strip() for m in allowed.split(",") if m.strip())))
    return HTTPStatus(status).phrase


def validation_message(errors: list[dict]) -> str:
    """pydantic's error list -> one sentence per bad field, naming the field and the fix."""
    parts = []
    for error in errors:
        location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query")]
        field = ".".join(location) or "request"
        if error.get("type") == "missing":
            parts.append(f"missing form field '{field}': {FIELD_HINTS.get(field, 'it is required')}")
        elif field == "file":
            parts.append(f"the 'file' field must be an uploaded file, not text: {FIELD_HINTS['file']}")
        else:
            parts.append(f"'{field}': {error.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as {"error": "..."}: one place, one shape."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.headers, request.scope, exc.param)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, validation_message(exc.errors()), scope=request.scope)

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


CUT_OFF = "the multipart body ended before its closing boundary: the upload was cut off; send the whole request"


class RequestGuard:
    """What one request may hold: a body of at most `max_bytes` (or `path_max_bytes[path]`; 413,
    whether or not it declared its length, before the whole body is buffered), all of it within
    `body_timeout_s` (408), and an answer within `request_timeout_s` (504). The bodies one API worker
    reads and decodes at once add up to `max_reading_bytes` at most: past it a request gets 503 at
    once (a busy server is not the client's fault). A client that hangs up cancels its request, and
    so its call to the model. Each error is JSON and goes through the request log."""

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
        self.reading_bytes = 0  # reserved by the requests in this process now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.path_max_bytes.get(scope.get("path", ""), self.max_bytes)
        too_large = f"the request body is larger than {max_bytes / 1024 / 1024:g} MB"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            return await error_response(413, too_large, scope=scope)(scope, receive, send)
        reserved = int(declared) if declared is not None and declared.isdigit() else max_bytes
        if self.reading_bytes and self.reading_bytes + reserved > self.max_reading_bytes:
            busy = "the server is busy reading other uploads; retry shortly"
            return await error_response(503, busy, {"Retry-After": "1"}, scope)(scope, receive, send)
        self.reading_bytes += reserved
        try:
            await self.guarded(scope, receive, send, max_bytes, too_large)
        finally:
            self.reading_bytes -= reserved

    async def guarded(self, scope: Scope, receive: Receive, send: Send, max_bytes: int, too_large: str) -> None:
        received = 0
        closing = multipart_closing(scope)  # b"--boundary--" of a multipart body, or None
        tail = b""
        body_deadline = time.monotonic() + self.body_timeout_s
        refusal: JSONResponse | None = None  # set once the body broke a limit
        started = answered = False
        hang_up: asyncio.Task | None = None  # reads `receive` once the body is in: a disconnect

        async def guarded_receive() -> Message:
            nonlocal received, refusal, tail, hang_up
            if hang_up is not None:  # later reads only wait for a disconnect
                await asyncio.shield(hang_up)
                return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), max(0.0, body_deadline - time.monotonic()))
            except TimeoutError:
                refusal = error_response(
                    408,
                    f"the request body did not arrive within {self.body_timeout_s:g} s; send it faster or smaller",
                    scope=scope,
                )
                raise BodyRefused() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if closing is not None:  # did the body end with its closing boundary?
                    tail = (tail + message.get("body", b""))[-(len(closing) + 8) :]
                    if body_done:
                        scope.setdefault("state", {})["multipart_complete"] = closing in tail
                if received > max_bytes:
                    refusal = error_response(413, too_large, scope=scope)
                    raise BodyRefused()
                if body_done:
                    hang_up = asyncio.ensure_future(wait_for_disconnect(receive))
                    hang_up.add_done_callback(lambda _: None if answered else work.cancel())
            return message

        async def guarded_send(message: Message) -> None:
            # Whatever the app answers once the body broke a limit (FastAPI turns the read error
            # into a 400), the client gets the refusal instead.
            nonlocal started, answered
            if refusal is not None:
                return
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        work = asyncio.ensure_future(self.app(scope, guarded_receive, guarded_send))
        try:
            await asyncio.wait_for(work, self.request_timeout_s)
        except BodyRefused:
            pass
        except TimeoutError:
            if not started:
                timed_out = f"no caption within {self.request_timeout_s:g} s; retry later"
                await error_response(504, timed_out, scope=scope)(scope, receive, send)
            return
        except asyncio.CancelledError:
            if hang_up is None or not hang_up.done() or hang_up.cancelled():
                raise  # cancelled from outside, not by the client's hang-up
            return  # the client is gone: nothing to answer
        finally:
            work.cancel()
            if hang_up is not None:
                hang_up.cancel()
        if refusal is not None and not started:
            await refusal(scope, receive, send)


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class CallerGone(Exception):
    """The caller closed its connection before the answer: nobody is waiting for it."""


async def until_disconnected(request: Request, call: Awaitable[T]) -> T:
    """Await `call`, cancelling it if the HTTP client of `request` (a Starlette request whose body
    was read) disconnects first: then raise CallerGone. The API service's call is cancelled, and so
    disconnects, when its own request is answered or abandoned."""
    work = asyncio.ensure_future(call)
    hang_up = asyncio.ensure_future(wait_for_disconnect(request.receive))  # the body was read: only a disconnect comes
    try:
        await asyncio.wait({work, hang_up}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        raise CallerGone()
    finally:
        hang_up.cancel()
        work.cancel()


class BodyRefused(Exception):
    pass


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
