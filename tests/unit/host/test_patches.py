"""blip_serve/host/patches.py in-process: that applying a patch
twice changes nothing more than the setting, and which paths count as routes for metrics."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from blip_serve.host import patches
from blip_serve.host.patches import has_route


def test_applying_twice_patches_once():
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    patches.apply()
    patched = RunnerTrafficMetricsMiddleware.__call__
    patches.apply()
    assert RunnerTrafficMetricsMiddleware.__call__ is patched


class Transport:
    def __init__(self):
        self.written, self.closed = b"", False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

    def set_protocol(self, protocol) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def test_a_second_header_timeout_changes_the_timer_and_its_408():
    from uvicorn.config import Config
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.server import ServerState

    async def a_client_that_stops_mid_headers() -> Transport:
        config = Config(app=lambda scope, receive, send: None, http="h11", log_level="critical")
        config.load()
        protocol = H11Protocol(
            config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
        )
        transport = Transport()
        protocol.connection_made(transport)
        protocol.data_received(b"GET /caption HT")
        await asyncio.sleep(0.3)
        return transport

    patches.time_out_silent_connections(60.0)
    patches.time_out_silent_connections(0.1)
    try:
        transport = asyncio.run(a_client_that_stops_mid_headers())
    finally:
        patches.time_out_silent_connections(60.0)  # as the API's workers run it
    assert transport.closed
    assert transport.written.startswith(b"HTTP/1.1 408 Request Timeout")
    assert b'{"error": "no complete request headers within 0.1 s; connection closed"}' in transport.written


def routes_app() -> Starlette:
    api = FastAPI()
    api.post("/caption")(lambda: None)
    return Starlette(routes=[Route("/readyz", lambda r: None), Mount("/static", routes=[]), Mount("/", api)])


@pytest.mark.parametrize(
    "path, known",
    [
        ("/readyz", True),
        ("/caption", True),
        ("/nope", False),
        ("/caption/x", False),
        ("/static/a.js", False),
        ("/", False),
    ],
)
def test_only_paths_with_a_route_get_metric_labels(path, known):
    assert has_route(routes_app(), {"type": "http", "path": path, "method": "GET", "root_path": ""}) is known
