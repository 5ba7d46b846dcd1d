"""The errors a request can end in, each with its HTTP status, and the one JSON shape every error
is sent in (error_body), by the API's handlers and middlewares (api/http.py), the patched protocol
(host/patches.py) and, held to it by tests/unit/test_nginx_config.py, nginx."""

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


def error_body(status: int, message: str, path: str = "", param: str | None = None) -> dict:
    """Every error's JSON, wherever it is sent from (the handlers, the middlewares, the patched
    protocol's raw bytes; nginx's own answers are held to it by tests/unit/test_nginx_config.py):
    {"error": message}, and on the OpenAI-compatible routes (/v1/...) OpenAI's error shape."""
    if path.startswith("/v1/"):
        return openai_error(status, message, param)
    return {"error": message}
