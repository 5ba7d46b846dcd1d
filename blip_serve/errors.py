"""The errors a client can cause, each with its HTTP status; `service.py` renders them as
`{"error": message}` in one place."""

from __future__ import annotations


class ClientError(Exception):
    """A request the server will not caption; the message says what is wrong and what works."""

    status_code = 400

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ClientError):
    status_code = 400


class Unauthorized(ClientError):
    status_code = 401


class PayloadTooLarge(ClientError):
    status_code = 413


class UnsupportedImage(ClientError):
    status_code = 415


class Unavailable(ClientError):
    """Not the client's fault, but theirs to retry: the batch queue cannot meet its latency budget,
    or the model worker is restarting. Sent with Retry-After."""

    status_code = 503

    def __init__(self, message: str):
        super().__init__(message, headers={"Retry-After": "5"})
