"""The API's documentation as blip-serve serves it: /docs.json (OpenAPI, with the project's title,
version and every route) and / (Swagger UI from BentoML's bundled files).

BentoML's own page at / loads Google Tag Manager from the internet, and its /docs.json is generic
(version "None"); a server meant to run offline serves these instead: the page makes no request
outside the server.
"""

from __future__ import annotations

import copy

from fastapi import FastAPI

from blip_serve import __version__

DESCRIPTION = (
    "Image captions from Salesforce's BLIP. POST an image to /caption (multipart field `file`, JSON "
    "base64, or the raw body), or up to 32 to /captions; or use OpenAI's chat completions API at "
    "/v1/chat/completions (an image_url part) and /v1/models. Every error is a JSON object "
    '`{"error": "..."}` with the status given for each route (on /v1/..., OpenAI\'s error shape); '
    "GET /info says which model serves."
)

HEALTH = {
    "/readyz": "200 once the model is loaded and the server is not draining, else 503; answers at once",
    "/livez": "200 while the API process runs",
    "/metrics": "Prometheus metrics: BentoML's request metrics and the batcher's (blip_batch_size, "
    "blip_queue_wait_seconds, blip_images_queued, blip_images_in_batch, blip_images_dropped_total, "
    "blip_model_busy_seconds_total)",
}

PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>blip-serve API</title>
    <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css" />
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script>window.ui = SwaggerUIBundle({url: "./docs.json", dom_id: "#swagger-ui"});</script>
  </body>
</html>
"""


TOKEN_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens")


def openapi_document(app: FastAPI, max_new_tokens_limit: int) -> dict:
    """FastAPI's document for the app's routes, plus the health and metrics routes BentoML serves.
    Every token-count field says the limit the server enforces (TextLimits: the setting, clamped
    to the model's positions, which the routes' declarations cannot know before the model loads)."""
    document = copy.deepcopy(app.openapi())
    set_token_limit(document, max_new_tokens_limit)
    document["info"] = {"title": "blip-serve", "version": __version__, "description": DESCRIPTION}
    paths = dict(document["paths"])
    for path, summary in HEALTH.items():
        content = "text/plain" if path != "/metrics" else "text/plain; version=0.0.4"
        paths[path] = {
            "get": {"summary": summary, "responses": {"200": {"description": summary, "content": {content: {}}}}}
        }
    document["paths"] = paths
    return document


def set_token_limit(node: object, limit: int) -> None:
    """`maximum` of every token-count field: body properties and query parameters."""
    if isinstance(node, dict):
        properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        fields = [properties.get(name) for name in TOKEN_FIELDS]
        if node.get("in") == "query" and node.get("name") in TOKEN_FIELDS:
            fields.append(node.get("schema"))
        for field in fields:
            if isinstance(field, dict):
                field["maximum"] = limit
        for value in node.values():
            set_token_limit(value, limit)
    elif isinstance(node, list):
        for value in node:
            set_token_limit(value, limit)
