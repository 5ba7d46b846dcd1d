"""The real Prometheus binary (Debian's `prometheus`) scraping test servers."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from tools.servers import ServerProcess, free_port

SCRAPE_INTERVAL_S = 1


def PrometheusServer(targets: list[str], folder: Path) -> ServerProcess:
    """Prometheus scraping `targets` (host:port, path /metrics) every second, its data in `folder`.
    Ready once /-/ready says 200: ServerProcess waits on /readyz, so the readiness path is mapped."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    listed = ", ".join(f'"{t}"' for t in targets)
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n  evaluation_interval: {SCRAPE_INTERVAL_S}s\n"
        f"scrape_configs:\n  - job_name: blip-serve\n    static_configs:\n      - targets: [{listed}]\n"
    )
    command = [
        shutil.which("prometheus") or "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.route-prefix=/",
        "--web.external-url=http://127.0.0.1/",
    ]
    server = ServerProcess(command, port, {}, folder / "prometheus.log")
    server.ready_path = "/-/ready"
    return server


def query(prometheus: ServerProcess, promql: str) -> float | None:
    """The instant value of `promql` (a single-series result), or None when it has no series."""
    answer = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert answer["status"] == "success", answer
    result = answer["data"]["result"]
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None
