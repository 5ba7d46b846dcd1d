"""blip_serve/shared/routes.py: the one list of the API's routes, and what reads it. A route declared
there reaches the drain, the body limits, the 404's words and the nginx check without another edit;
service.py's app is held to the list in tests/unit/test_service.py."""

from __future__ import annotations

import asyncio
import math
import re

from blip_serve.api.http import RequestGuard
from blip_serve.host.drain import CaptionsInFlight, InFlight
from blip_serve.shared import routes
from blip_serve.shared.routes import ROUTES, Route, body_limits, caption_paths, not_found
from blip_serve.shared.settings import Settings
from tools.servers import REPO

NGINX = (REPO / "nginx" / "nginx.conf").read_text()
MB = 1024 * 1024
DESCRIBE = Route("POST", "/describe", captions=True, body_limit="max_upload_bytes")  # a route someone adds


def nginx_locations() -> dict[str, str | None]:
    """Each exact location in nginx.conf -> its client_max_body_size ("64m"), or None."""
    found = {}
    for path, body in re.findall(r"location = (\S+) \{(.*?)\n        \}", NGINX, re.S):
        size = re.search(r"client_max_body_size (\d+m);", body)
        found[path] = size.group(1) if size else None
    return found


def nginx_disagrees(declared: tuple[Route, ...], settings: Settings) -> list[str]:
    """The routes nginx does not forward as declared: no exact location, or another body limit
    (nginx counts whole megabytes; a route at the server-wide limit needs no size of its own)."""
    server_wide = re.search(r"^\s*client_max_body_size (\d+m);", NGINX, re.M).group(1)
    locations = nginx_locations()
    wrong = []
    for route in declared:
        if route.path not in locations:
            wrong.append(route.path)
        elif route.body_limit:
            expected = f"{math.ceil(route.max_body_bytes(settings) / MB)}m"
            if (locations[route.path] or server_wide) != expected:
                wrong.append(route.path)
    return wrong


def test_nginx_forwards_every_declared_route_with_its_body_limit():
    assert nginx_disagrees(ROUTES, Settings()) == []


def test_a_route_declared_once_reaches_the_drain_the_limits_the_404_and_the_nginx_check():
    settings = Settings(max_upload_bytes=3 * MB)
    declared = (*ROUTES, DESCRIBE)
    assert "/describe" in caption_paths(declared) and "/describe" not in caption_paths()
    assert body_limits(settings, declared)["/describe"] == 3 * MB
    assert "POST /describe" in not_found(openai=False, routes=declared)
    assert nginx_disagrees(declared, Settings()) == ["/describe"]  # until nginx.conf forwards it

    # The drain counts its requests while they run; the guard refuses its bodies over the limit.
    counter, seen = InFlight(), []

    async def app(scope, receive, send):
        seen.append(counter.count)

    counting = CaptionsInFlight(app, counter, paths=caption_paths(declared))
    asyncio.run(counting({"type": "http", "path": "/describe"}, None, None))
    assert seen == [1] and counter.count == 0
    guard = RequestGuard(app, MB, 10.0, 60.0, 64 * MB, path_max_bytes=body_limits(settings, declared))
    assert guard.limit_for("/describe") == 3 * MB and guard.limit_for("/elsewhere") == MB


def test_the_404s_name_the_declared_routes():
    assert routes.NOT_FOUND == "no such path; the API is POST /caption, POST /captions (see /docs.json)"
    assert routes.OPENAI_NOT_FOUND == (
        "no such path; the OpenAI-compatible routes are POST /v1/chat/completions and GET /v1/models"
    )


def test_the_drain_waits_for_every_route_that_sends_images_to_the_model():
    assert caption_paths() == ("/caption", "/captions", "/v1/chat/completions")
    assert CaptionsInFlight(None, InFlight()).paths == caption_paths()
