"""Where BentoML keeps the model service's address in an API worker, and how its client says it closed
its session: private to BentoML 1.4 and aiohttp, so behind host/versions.py's gate."""

from __future__ import annotations

import json
import os


def service_address(name: str) -> str | None:
    """BentoML service `name`'s address in the runner map BentoML gives each worker
    (BENTOML_RUNNER_MAP): a Unix socket (file://...) or an http:// URL; None outside `bentoml serve`."""
    return json.loads(os.environ.get("BENTOML_RUNNER_MAP", "{}")).get(name)


def session_closed(exc: BaseException) -> bool:
    """BentoML's client closed its session under a request in flight: aiohttp raises a bare
    RuntimeError "Session is closed" (BentoML issues #4971, #5544)."""
    return isinstance(exc, RuntimeError) and "Session is closed" in str(exc)
