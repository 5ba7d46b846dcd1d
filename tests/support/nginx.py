"""The real nginx binary running nginx/nginx.conf in front of test servers."""

from __future__ import annotations

import re
from pathlib import Path

from tools.servers import REPO, ServerProcess, free_port

NGINX_CONF = REPO / "nginx" / "nginx.conf"
NGINX_UPSTREAM = "server bento:3000 max_fails=1 fail_timeout=5s;"


def NginxServer(upstream_urls: list[str], prefix: Path, directives: dict[str, str] | None = None) -> ServerProcess:
    """The real nginx binary running nginx/nginx.conf, with the compose upstream, port and temp paths
    swapped for local ones, and the values of `directives` (e.g. {"client_body_timeout": "2s"})
    replaced. `prefix` must be reachable by nginx's unprivileged worker user."""
    port = free_port()
    conf = NGINX_CONF.read_text()
    for name, value in (directives or {}).items():
        conf, found = re.subn(rf"^(\s*{name}) [^;]+;", rf"\1 {value};", conf, flags=re.MULTILINE)
        assert found == 1, f"nginx/nginx.conf has no single {name} directive"
    for original in (NGINX_UPSTREAM, "listen 80;", "/tmp/nginx"):
        assert original in conf, f"nginx/nginx.conf no longer has {original!r}: update NginxServer"
    servers = "\n        ".join(
        f"server {url.removeprefix('http://')} max_fails=1 fail_timeout=5s;" for url in upstream_urls
    )
    conf = conf.replace(NGINX_UPSTREAM, servers).replace("listen 80;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("/tmp/nginx", str(prefix))
    prefix.mkdir(parents=True, exist_ok=True)
    prefix.chmod(0o755)
    (prefix / "nginx.conf").write_text(conf)
    command = ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"]
    return ServerProcess(command, port, {}, prefix / "nginx.log")
