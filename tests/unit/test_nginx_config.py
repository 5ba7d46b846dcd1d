"""nginx/nginx.conf's own answers and limits, read as text and held to the server's one home for
each rule: the error shape (http.error_body), the words of the errors both send, and the limits
(settings.py). No nginx needed; tests/integration/test_nginx.py runs the real one."""

from __future__ import annotations

import json
import math
import re

from blip_serve.api.http import too_large
from blip_serve.shared.errors import error_body
from blip_serve.shared.routes import NOT_FOUND, OPENAI_NOT_FOUND
from blip_serve.shared.settings import Settings
from tools.servers import REPO

CONF = (REPO / "nginx" / "nginx.conf").read_text()
MB = 1024 * 1024


def answers() -> dict[str, tuple[int, dict]]:
    """location -> (status, JSON body) of every `return CODE '...'` in the file."""
    found = {}
    for name, status, body in re.findall(r"location ([^{]+?) \{[^}]*?return (\d{3}) '(.*?)';", CONF, re.S):
        found[name.strip()] = (int(status), json.loads(body.removesuffix("\\n")))
    return found


def test_errors_nginx_shares_with_the_server_say_the_same():
    settings = Settings()
    chat_limit_mb = math.ceil(settings.chat_body_bytes() / MB)  # nginx counts whole megabytes
    expected = {
        "@not_found": (404, error_body(404, NOT_FOUND)),
        "^~ /v1/": (404, error_body(404, OPENAI_NOT_FOUND, "/v1/")),
        "@too_large": (413, error_body(413, too_large(settings.max_upload_bytes))),
        "@too_large_batch": (413, error_body(413, too_large(settings.max_request_bytes))),
        "@openai_too_large": (413, error_body(413, too_large(chat_limit_mb * MB), "/v1/")),
    }
    found = answers()
    for location, answer in expected.items():
        assert found[location] == answer, location


def test_every_nginx_error_has_the_servers_shape():
    found = answers()
    assert len(found) >= 12
    for location, (status, body) in found.items():
        openai = "openai" in location or "/v1/" in location
        message = body["error"]["message"] if openai else body["error"]
        assert body == error_body(status, message, "/v1/" if openai else ""), location


def test_nginx_body_limits_are_the_settings():
    settings = Settings()
    limits = dict(re.findall(r"location = (\S+) \{\s*client_max_body_size (\d+)m;", CONF))
    assert re.search(r"^\s*client_max_body_size (\d+)m;", CONF, re.M).group(1) == str(settings.max_upload_bytes // MB)
    assert limits == {
        "/captions": str(settings.max_request_bytes // MB),
        "/v1/chat/completions": str(math.ceil(settings.chat_body_bytes() / MB)),
    }
