"""HTTP plumbing for the API service: error rendering, the upload size limit, request logs."""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ClientError

logger = logging.getLogger("bentoml.blip_serve")  # under "bentoml": BentoML's log handlers and format

FIELD_HINTS = {
    "file": "send the image as multipart/form-data field 'file' (e.g. curl -F file=@photo.jpg)",
}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> str:
    """pydantic's error list -> one sentence per bad field, naming the field and the fix."""
    parts = []
    for error in exc.errors():
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

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error for request %s", getattr(request.state, "request_id", "-"))
        return error_response(500, "internal error: the server failed to caption this image; see its log")


class UploadLimitMiddleware:
    """Answer 413 once a request body passes `max_bytes`, whether or not it declared its length,
    before the whole body is buffered."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit_text = f"the request body is larger than {self.max_bytes / 1024 / 1024:g} MB"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(413, limit_text)(scope, receive, send)

        received = 0
        too_large = False
        replaced = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise BodyTooLarge()
            return message

        async def replacing_send(message: Message) -> None:
            # Whatever the app answers after the limit was hit (FastAPI turns the read error into
            # a 400), the client gets the 413.
            nonlocal replaced
            if too_large:
                if not replaced:
                    replaced = True
                    await error_response(413, limit_text)(scope, receive, send)
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, replacing_send)
        except BodyTooLarge:
            pass
        if too_large and not replaced:
            await error_response(413, limit_text)(scope, receive, send)


class BodyTooLarge(Exception):
    pass


class RequestLogMiddleware:
    """One log line per request (id, image size, status, latency) and an X-Request-ID header."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode("latin-1")))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            image_size = scope["state"].get("image_size", "-")
            logger.info(
                "request_id=%s method=%s path=%s image=%s status=%d latency_ms=%.1f",
                request_id, scope.get("method"), scope.get("path"), image_size, status,
                (time.perf_counter() - started) * 1000,
            )
