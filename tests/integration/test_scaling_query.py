"""The autoscaler's view: the exact query of k8s/'s KEDA ScaledObject, evaluated by a real Prometheus
scraping the real server while a known number of caption requests are in flight."""

from __future__ import annotations

import shutil
import socket
import time

import pytest

from support.clients import multipart_head
from support.k8s import one, render
from support.prometheus import SCRAPE_INTERVAL_S, PrometheusServer, query
from tools.servers import bento_server

pytestmark = [
    pytest.mark.slow,  # starts the real server
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed (.ci/run installs it)"),
]


def hold_request(url: str, path: str) -> socket.socket:
    """A caption request whose upload has begun and stays unfinished: in flight until closed."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(multipart_head(100_000, path) + b"\xff\xd8" * 100)
    return sock


def settles_at(prometheus, promql: str, expected: float, within_s: float) -> list[float | None]:
    """Values of `promql` seen until it reads `expected` (a few scrapes at most); all of them."""
    seen: list[float | None] = []
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        seen.append(query(prometheus, promql))
        if seen[-1] == expected:
            return seen
        time.sleep(SCRAPE_INTERVAL_S / 2)
    raise AssertionError(f"{promql} never read {expected} in {within_s} s: {seen}")


def test_the_scaling_query_counts_the_requests_in_flight(tiny_model_dir, tmp_path):
    promql = one(render("cpu"), "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    env = {"BLIP_MODEL": tiny_model_dir, "BLIP_BODY_TIMEOUT_S": "120"}
    with bento_server(env, tmp_path / "bentoml.log") as server:
        target = server.url.removeprefix("http://")
        with PrometheusServer([target], tmp_path / "prometheus") as prometheus:
            settles_at(prometheus, promql, 0.0, within_s=30)  # scraped, nothing in flight
            held = [hold_request(server.url, "/caption") for _ in range(5)]
            try:
                settles_at(prometheus, promql, 5.0, within_s=10)
                held += [hold_request(server.url, "/captions") for _ in range(3)]
                seen = settles_at(prometheus, promql, 8.0, within_s=10)
                # Other routes are not load: /readyz, /metrics and unknown paths never count.
                assert all(value is not None and 5.0 <= value <= 8.0 for value in seen), seen
            finally:
                for sock in held:
                    sock.close()
            settles_at(prometheus, promql, 0.0, within_s=15)
