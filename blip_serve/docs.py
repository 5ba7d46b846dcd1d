"""The API's documentation as blip-serve serves it: /docs.json (OpenAPI, with the project's title,
version and every route) and / (Swagger UI from BentoML's bundled files).

BentoML's own page at / loads Google Tag Manager from the internet, and its /docs.json is generic
(version "None"); a server meant to run offline serves these instead: the page makes no request
outside the server.
"""

from __future__ import annotations

from fastapi import FastAPI

from . import __version__

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


def openapi_document(app: FastAPI) -> dict:
    """FastAPI's document for the app's routes, plus the health and metrics routes BentoML serves."""
    document = dict(app.openapi())
    document["info"] = {"title": "blip-serve", "version": __version__, "description": DESCRIPTION}
    paths = dict(document["paths"])
    for path, summary in HEALTH.items():
        content = "text/plain" if path != "/metrics" else "text/plain; version=0.0.4"
        paths[path] = {
            "get": {"summary": summary, "responses": {"200": {"description": summary, "content": {content: {}}}}}
        }
    document["paths"] = paths
    return document
