"""service.py's API in-process: the real FastAPI app and CaptionAPI (upload parsing, limits, the
decode processes, error rendering) under Starlette's TestClient, with a stand-in for the model
service only. Every request a client can get wrong, and what it gets back; the integration tests
send the right ones through the real `bentoml serve`."""

from __future__ import annotations

import base64
import time

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from blip_serve.shared.jobs import CaptionResult
from blip_serve.shared.routes import ROUTES
from support.error_cases import ERROR_CASES
from support.images import encode, scene
from support.openai_messages import image_message

IMAGES = [encode(scene(700 + i), "PNG") for i in range(6)]


class ModelService:
    """Answers every job with a caption: what these tests check happens before the model."""

    class to_async:
        @staticmethod
        async def caption_batch(jobs, timeout_s: float, client: str) -> list[CaptionResult]:
            return [CaptionResult(caption="a caption") for _ in jobs]


@pytest.fixture(scope="module")
def api(tiny_model_dir):
    from _bentoml_sdk.service import get_current_service

    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("BLIP_MODEL", tiny_model_dir)  # read once, when service.py is imported
        import service

    caption_api = service.CaptionAPI.inner()
    caption_api.model = ModelService()
    service.app.dependency_overrides[get_current_service] = lambda: caption_api
    with TestClient(service.app) as client:
        yield client
        client.portal.call(caption_api.decoders.close)
    service.app.dependency_overrides.clear()


def test_the_stand_in_model_answers(api):
    response = api.post("/caption", files={"file": ("a.png", IMAGES[0])})
    assert response.status_code == 200 and response.json() == {"caption": "a caption"}


# (request fields, status, the parameter named, words in the message)
REFUSALS = {
    "another model": ({"model": "gpt-4o"}, 404, "model", "does not exist"),
    "no image": (
        {"messages": [{"role": "user", "content": "describe this"}]},
        400,
        "messages",
        "exactly one image_url",
    ),
    "two images": (
        {"messages": [{"role": "user", "content": image_message()[0]["content"] * 2}]},
        400,
        "messages",
        "POST /captions",
    ),
    "an image in an earlier message": (
        {"messages": image_message() + [{"role": "assistant", "content": "x"}] + image_message()},
        400,
        "messages",
        "only the last user message",
    ),
    "n of 2": ({"n": 2}, 400, "n", "'n' must be 1"),
    "sampling": ({"temperature": 0.7}, 400, "temperature", "sampling is not supported"),
    "logprobs": ({"logprobs": True}, 400, "logprobs", "not supported"),
    "tools": (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        400,
        "tools",
        "tools are not supported",
    ),
    "max_tokens too large": ({"max_tokens": 100_000}, 400, "max_tokens", "'max_tokens'"),
    "a remote url": ({"messages": image_message("http://127.0.0.1:9/cat.jpg")}, 400, "messages", "data: URL"),
    "not base64": ({"messages": image_message("data:image/jpeg;base64,@@@")}, 400, None, "not valid base64"),
    "not an image": (
        {"messages": image_message("data:text/plain;base64," + base64.b64encode(b"hello").decode())},
        415,
        None,
        "not a supported image",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_each_refusal_is_in_openais_error_shape_and_names_the_parameter(api, case):
    fields, status, param, words = REFUSALS[case]
    body = {"model": api.get("/v1/models").json()["data"][0]["id"], "messages": image_message(), **fields}
    response = api.post("/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


@pytest.mark.parametrize(
    "files, data, status, words",
    [
        (None, {"prompt": "x"}, 400, "missing form field 'file'"),
        ([("file", (f"{i}.png", IMAGES[0])) for i in range(33)], None, 400, "at most 32 'file' parts"),
        ([("file", ("a.png", IMAGES[0]))], {"max_new_tokens": "0"}, 400, "max_new_tokens"),
        ([("file", ("a.png", IMAGES[0]))], {"prompt": "dog " * 40, "max_new_tokens": "100"}, 400, "positions"),
    ],
    ids=["no files", "too many files", "bad option", "prompt over the positions"],
)
def test_whole_request_errors(api, files, data, status, words):
    response = api.post("/captions", files=files, data=data, timeout=120)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_a_body_over_the_request_limit_is_413(api):
    parts = [("file", (f"{i}.bin", b"\0" * (9 * 1024 * 1024))) for i in range(8)]  # 72 MB
    response = api.post("/captions", files=parts, timeout=120)
    assert response.status_code == 413
    assert response.json() == {"error": "the request body is larger than 64 MB"}


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"image": "not base64!!"}, 400, "not valid base64"),
        ({"image": "https://127.0.0.1:9/cat.jpg"}, 400, "not a URL: the server never fetches URLs"),
        ({"image": 12}, 400, 'needs "image"'),
        ([1, 2], 400, 'needs "image"'),
        ({"image": base64.b64encode(b"hello").decode()}, 415, "not a supported image"),
        ({"image": base64.b64encode(IMAGES[0]).decode(), "num_beams": 99}, 400, "num_beams"),
    ],
    ids=["bad base64", "url", "wrong type", "not an object", "not an image", "bad option"],
)
def test_json_errors(api, body, status, words):
    response = api.post("/caption", json=body, timeout=60)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_json_nested_too_deep_is_a_400_not_a_500(api):
    deep = b"[" * 100_000 + b"]" * 100_000
    response = api.post("/caption", content=deep, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json() == {"error": 'the JSON body is nested too deeply: send {"image": "<base64>", "prompt": ...}'}


def test_other_bodies_are_refused_with_what_works(api):
    response = api.post("/caption", content=b"hello", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    assert "multipart/form-data (field 'file'), application/json" in response.json()["error"]
    big = api.post("/caption", json={"image": "A" * (11 * 1024 * 1024)}, timeout=60)
    assert big.status_code == 413


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_client_errors_are_json_4xx(api, case):
    files, data, status, words = ERROR_CASES[case]
    response = api.post("/caption", files=files, data=data, timeout=60)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert words in body["error"]


def test_json_without_an_image_says_what_it_needs(api):
    response = api.post("/caption", json={"file": "x"})
    assert response.status_code == 400
    assert response.json() == {"error": 'the JSON body needs "image": the image\'s bytes in base64 (or a data: URL)'}


def test_upload_over_10_mb_is_413(api):
    big = b"\xff\xd8" + b"\0" * (11 * 1024 * 1024)
    response = api.post("/caption", files={"file": ("big.jpg", big)}, timeout=60)
    assert response.status_code == 413
    assert "10 MB" in response.json()["error"]


def test_a_wrong_v1_path_names_the_routes_there_are(api):
    response = api.post("/v1/chat/completion", json={})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == (
        "no such path; the OpenAI-compatible routes are POST /v1/chat/completions and GET /v1/models"
    )
    wrong_method = api.post("/v1/models")
    assert wrong_method.status_code == 405 and "use GET" in wrong_method.json()["error"]["message"]


def test_caption_errors_keep_their_own_shape(api):
    response = api.post("/caption", files={"file": ("a.txt", b"hello")})
    assert response.status_code == 415 and set(response.json()) == {"error"}
    assert isinstance(response.json()["error"], str)


def test_invalid_json_and_oversize_bodies_are_openai_errors_too(api):
    response = api.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    huge = api.post(
        "/v1/chat/completions",
        content=b"x" * (20 * 1024 * 1024),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert huge.status_code == 413 and huge.json()["error"]["type"] == "invalid_request_error"


def test_uploads_never_need_the_temporary_directory(api, monkeypatch):
    """Before: with the temporary directory full, an upload over 1 MB (Starlette spooled it to a
    file) was a 500."""
    import errno
    import io
    import tempfile

    import numpy as np
    from PIL import Image

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", disk_full)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", disk_full)
    noise = np.random.default_rng(1).integers(0, 255, (1200, 1000, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(noise).save(png, "PNG")
    assert png.tell() > 3 * 1024 * 1024
    response = api.post("/caption", files={"file": ("noise.png", png.getvalue())}, timeout=60)
    assert response.status_code == 200, response.text
    batch = api.post("/captions", files=[("file", ("a.png", png.getvalue())), ("file", ("b.png", png.getvalue()))])
    assert batch.status_code == 200 and len(batch.json()["captions"]) == 2, batch.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/caption"])
def test_a_json_body_of_a_million_values_is_refused_before_it_is_parsed(api, path):
    """Before: 14 MB of `[],[],...` became ~250 MB of Python lists per request, and 17 such bodies
    held the API's event loop for seconds (/livez 6.5 s; API 121 -> 655 MB). Now: 400 at once."""
    junk = b"[" + b"[]," * 1_000_000 + b"[]]"
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "image": "", "junk": ' + junk + b"}"
    started = time.monotonic()
    response = api.post(path, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    assert message.startswith("the JSON body holds too many values (over 100,000): send ")
    assert time.monotonic() - started < 2


def test_the_openapi_document_names_the_project_and_every_route(api):
    from blip_serve import __version__

    spec = api.get("/docs.json", timeout=10).json()
    assert (spec["info"]["title"], spec["info"]["version"]) == ("blip-serve", __version__)
    assert {"/caption", "/captions", "/info", "/readyz", "/livez", "/metrics"} <= set(spec["paths"])
    assert {"/v1/chat/completions", "/v1/models"} <= set(spec["paths"])
    chat = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat["required"] == ["model", "messages"]
    assert set(spec["paths"]["/caption"]["post"]["responses"]) >= {"200", "400", "413", "415", "503", "504"}


def test_openapi_describes_every_body(api):
    spec = api.get("/docs.json").json()
    caption = spec["paths"]["/caption"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json", "image/*", "application/octet-stream"} <= set(caption)
    captions = spec["paths"]["/captions"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert captions["properties"]["file"]["maxItems"] == 32


def app_routes(routes) -> set[tuple[str, str]]:
    """(method, path) of every APIRoute, inside included routers too (how BentoML mounts a service's)."""
    found = set()
    for route in routes:
        if isinstance(route, APIRoute):
            found |= {(method, route.path) for method in route.methods}
        elif hasattr(route, "original_router"):  # FastAPI's wrapper of an included router
            found |= app_routes(route.original_router.routes)
    return found


def test_the_app_serves_the_declared_routes_and_no_others(api):
    """Every route service.py registers is declared in shared/routes.py, where the drain, the body
    limits, the 404s and the nginx check read it (tests/unit/shared/test_routes.py)."""
    import service

    assert app_routes(service.app.routes) == {(route.method, route.path) for route in ROUTES}
