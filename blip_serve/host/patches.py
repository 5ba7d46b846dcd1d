"""Workarounds for things BentoML's server does that a public endpoint cannot afford.

Each replaces private code of the versions in host/versions.py, where no public setting does the job,
and each is tested by the suite. service.py applies them from one place: `apply()` at import, in
every server process (it refuses to start on other versions of those packages), and
`time_out_silent_connections` in the API's workers. Applying one twice changes nothing more.

1. bound_metric_labels: BentoML's metrics middleware labels every request with its raw path, so
   each new unknown path a client sends adds ~20 series to /metrics (4,000 such requests made a
   178 MB scrape). Here a request whose path matches no route skips that middleware: it still
   gets its JSON 404, but adds no series. Upstream: RunnerTrafficMetricsMiddleware in
   bentoml/_internal/server/http/instruments.py labels `endpoint=scope["path"]`.
2. time_out_silent_connections: uvicorn's h11 protocol (what BentoML runs) starts no timer on a
   new connection, nor while a request's headers trickle in, so a silent or slow client holds a
   connection forever (slowloris). Here a connection that has not sent complete headers within
   `header_timeout_s` (on connect, and after each response) is closed: with a JSON 408 if part of
   a request had arrived, silently if nothing had (as a keep-alive timeout closes, so that a client
   that sends just then sees a closed connection, which it retries, not a 408 for its request).
   use_h11 keeps uvicorn on h11 where httptools is installed too, so this always applies.
   uvicorn's own 400 for bytes that are not HTTP is sent as JSON too. Applied in the API process
   only: the model service's connections come from the API service.
3. remove_sockets_after_workers: on SIGTERM, BentoML's Arbiter.stop() first deletes the folder of
   its Unix sockets (the API's way to the model service), then stops the workers. During a drain
   the API must still reach the model: a request that needed a new connection found no socket
   and got 503 (seen as the drain test failing under load, when every pooled connection was busy).
   Here the folder goes once the workers have exited. Upstream: Arbiter.stop in
   bentoml/_internal/utils/circus/__init__.py runs `exit_stack` before `super().stop()`.
"""

from __future__ import annotations

import json

from starlette.routing import Match

from blip_serve.host.versions import check_versions
from blip_serve.shared.errors import error_body


def apply() -> None:
    """The patches every server process needs, after checking the versions they were written for."""
    check_versions()  # host/versions.py: every private touch below and elsewhere in host/ relies on them
    bound_metric_labels()
    use_h11()  # the header timeout patches h11; httptools, if installed, would bypass it
    remove_sockets_after_workers()  # a draining API still reaches the model service


def bound_metric_labels() -> None:
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    if getattr(RunnerTrafficMetricsMiddleware, "_blip_bounded", False):
        return
    labelled_call = RunnerTrafficMetricsMiddleware.__call__

    async def call(self, scope, receive, send):
        if scope["type"] == "http" and not has_route(self.app, scope):
            return await self.app(scope, receive, send)  # unlabelled: no new series
        return await labelled_call(self, scope, receive, send)

    RunnerTrafficMetricsMiddleware.__call__ = call
    RunnerTrafficMetricsMiddleware._blip_bounded = True


def find_router(app):
    """The Starlette router at the bottom of a middleware chain (each middleware holds `.app`)."""
    for _ in range(64):
        if hasattr(app, "routes") and not hasattr(app, "router"):
            return app
        app = getattr(app, "router", None) or getattr(app, "app", None)
        if app is None:
            return None
    return None


def has_route(app, scope: dict) -> bool:
    """Whether a route (any method) of `app`, or of an app mounted in it, matches the path.
    Mounted apps without routes of their own (static files) count as no route."""
    router = find_router(app)
    if router is None:
        return False
    for route in router.routes:
        match, child_scope = route.matches(scope)
        if match == Match.NONE:
            continue
        mounted = getattr(route, "app", None)
        if child_scope.get("root_path") is not None and mounted is not None and hasattr(route, "routes"):
            if has_route(mounted, {**scope, **child_scope}):
                return True
            continue
        return True
    return False


def json_response_bytes(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 error answer as bytes, for a connection that has no request (yet)."""
    body = json.dumps(error_body(status, message)).encode() + b"\n"
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def use_h11() -> None:
    """uvicorn's "auto" HTTP protocol: h11 always. With httptools installed (uvicorn[standard], which
    LitServe and many images pull in) uvicorn would pick httptools, and the header timeout below,
    a patch of the h11 protocol, would silently not apply. Call before uvicorn loads its config
    (at import of service.py: BentoML's worker imports the service first)."""
    import uvicorn.config

    uvicorn.config.HTTP_PROTOCOLS["auto"] = "uvicorn.protocols.http.h11_impl:H11Protocol"


def time_out_silent_connections(header_timeout_s: float) -> None:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    if getattr(H11Protocol, "_blip_header_timeout", None) is not None:
        H11Protocol._blip_header_timeout = header_timeout_s  # the timer and its 408 read it when they run
        return
    H11Protocol._blip_header_timeout = header_timeout_s

    def timed_out(timeout_s: float) -> bytes:
        message = f"no complete request headers within {timeout_s:g} s; connection closed"
        return json_response_bytes(408, "Request Timeout", message)

    not_http = json_response_bytes(400, "Bad Request", "the request is not valid HTTP/1.1")

    def arm(self) -> None:
        disarm(self)
        self._blip_partial = False  # no byte of the next request yet
        if not self.transport.is_closing():
            self._blip_header_timer = self.loop.call_later(self._blip_header_timeout, expire, self)

    def disarm(self) -> None:
        timer = getattr(self, "_blip_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._blip_header_timer = None

    def waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def expire(self) -> None:
        self._blip_header_timer = None
        if waiting_for_headers(self) and not self.transport.is_closing():
            if getattr(self, "_blip_partial", False):
                self.transport.write(timed_out(self._blip_header_timeout))
            self.transport.close()

    original = {
        name: getattr(H11Protocol, name)
        for name in ("connection_made", "connection_lost", "data_received", "handle_events", "on_response_complete")
    }

    def connection_made(self, transport) -> None:
        original["connection_made"](self, transport)
        arm(self)

    def connection_lost(self, exc) -> None:
        disarm(self)
        original["connection_lost"](self, exc)

    def data_received(self, data: bytes) -> None:
        if waiting_for_headers(self) and data:
            self._blip_partial = True
        original["data_received"](self, data)

    def handle_events(self) -> None:
        original["handle_events"](self)
        if not waiting_for_headers(self):
            disarm(self)  # a request has begun: the body has its own timeout (BLIP_BODY_TIMEOUT_S)

    def on_response_complete(self) -> None:
        original["on_response_complete"](self)
        if waiting_for_headers(self):
            arm(self)  # an idle keep-alive connection, or the next request's headers trickling

    def send_400_response(self, msg: str) -> None:
        self.transport.write(not_http)
        self.transport.close()

    H11Protocol.connection_made = connection_made
    H11Protocol.connection_lost = connection_lost
    H11Protocol.data_received = data_received
    H11Protocol.handle_events = handle_events
    H11Protocol.on_response_complete = on_response_complete
    H11Protocol.send_400_response = send_400_response


def remove_sockets_after_workers() -> None:
    """BentoML's arbiter cleans up (its Unix sockets' folder) after the workers stop, not before."""
    from bentoml._internal.utils import circus as bentoml_circus
    from circus.arbiter import Arbiter as CircusArbiter

    arbiter = bentoml_circus.Arbiter
    if getattr(arbiter, "cleans_up_last", False):
        return
    start = arbiter.start

    def start_then_clean_up(self, cb=None) -> None:
        try:
            start(self, cb)  # returns once the arbiter has stopped every worker
        finally:
            self.exit_stack.__exit__(None, None, None)  # an ExitStack runs its callbacks once

    arbiter.start = start_then_clean_up
    arbiter.stop = CircusArbiter.stop  # without running exit_stack first
    arbiter.cleans_up_last = True
