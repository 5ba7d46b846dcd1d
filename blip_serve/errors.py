"""The errors a request can end in, each with its HTTP status; `blip_serve/http.py` renders every
one (http.error_body) in one place."""

from __future__ import annotations


class ServiceError(Exception):
    """An answer other than a caption. The message says what happened and what the client can do."""

    status_code = 500

    def __init__(
        self,
        message: str,
        headers: dict[str, str] | None = None,
        status_code: int | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.param = param  # the request parameter at fault, where there is one (OpenAI's error shape names it)
        if status_code is not None:
            self.status_code = status_code


class ClientError(ServiceError):
    """The request itself is the problem: sending it again unchanged gets the same answer."""

    status_code = 400


class BadRequest(ClientError):
    status_code = 400


class Unauthorized(ClientError):
    status_code = 401


class NotFound(ClientError):
    status_code = 404


class PayloadTooLarge(ClientError):
    status_code = 413


class UnsupportedImage(ClientError):
    status_code = 415


class Unavailable(ServiceError):
    """Not the client's fault, but theirs to retry: the batch queue cannot meet its latency budget,
    or the model worker is restarting. Sent with Retry-After."""

    status_code = 503

    def __init__(self, message: str):
        super().__init__(message, headers={"Retry-After": "5"})
