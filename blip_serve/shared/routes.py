"""The API's routes, declared once. service.py registers each with FastAPI from here, and what else
depends on the list reads it too: the drain waits for the caption routes (host/drain.py), the
request guard limits each route's body (api/http.py), the 404s name the routes, and
tests/unit/shared/test_routes.py holds the app and nginx/nginx.conf to this table."""

from __future__ import annotations

from dataclasses import dataclass

from blip_serve.shared.settings import Settings


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    captions: bool = False  # it sends images to the model: a drain waits for it, and its body is limited
    body_limit: str = ""  # the Settings attribute or method giving its largest body (captions routes)

    @property
    def openai(self) -> bool:
        return self.path.startswith("/v1/")

    def max_body_bytes(self, settings: Settings) -> int:
        limit = getattr(settings, self.body_limit)
        return limit() if callable(limit) else limit


CAPTION = Route("POST", "/caption", captions=True, body_limit="max_upload_bytes")
CAPTIONS = Route("POST", "/captions", captions=True, body_limit="max_request_bytes")
CHAT_COMPLETIONS = Route("POST", "/v1/chat/completions", captions=True, body_limit="chat_body_bytes")
MODELS = Route("GET", "/v1/models")
INFO = Route("GET", "/info")
DOCS_JSON = Route("GET", "/docs.json")
DOCS_PAGE = Route("GET", "/")

ROUTES = (CAPTION, CAPTIONS, CHAT_COMPLETIONS, MODELS, INFO, DOCS_JSON, DOCS_PAGE)


def caption_paths(routes: tuple[Route, ...] = ROUTES) -> tuple[str, ...]:
    """The routes whose requests a drain waits for."""
    return tuple(route.path for route in routes if route.captions)


def body_limits(settings: Settings, routes: tuple[Route, ...] = ROUTES) -> dict[str, int]:
    """Each captions route's largest body, in bytes."""
    return {route.path: route.max_body_bytes(settings) for route in routes if route.body_limit}


def not_found(openai: bool, routes: tuple[Route, ...] = ROUTES) -> str:
    """The 404's words: the routes a client may have meant."""
    if openai:
        named = " and ".join(f"{route.method} {route.path}" for route in routes if route.openai)
        return f"no such path; the OpenAI-compatible routes are {named}"
    named = ", ".join(f"{route.method} {route.path}" for route in routes if route.captions and not route.openai)
    return f"no such path; the API is {named} (see /docs.json)"


NOT_FOUND = not_found(openai=False)
OPENAI_NOT_FOUND = not_found(openai=True)
