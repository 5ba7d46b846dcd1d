"""Many images per request (POST /captions) and the other ways into /caption (JSON base64, a raw
image body), against the real server: same captions as multipart /caption, and the right 4xx."""

from __future__ import annotations

import base64

import httpx
import pytest

from support.clients import batch_histogram, post_caption
from support.images import encode, header_only_jpeg, scene

pytestmark = pytest.mark.slow  # starts the real server

IMAGES = [encode(scene(700 + i), "PNG") for i in range(6)]


def post_captions(server, files, data=None) -> httpx.Response:
    return httpx.post(f"{server.url}/captions", files=files, data=data, timeout=120)


def test_captions_keeps_order_and_fails_bad_parts_alone(server, reference):
    parts = [
        ("file", ("a.png", IMAGES[0])),
        ("file", ("b.txt", b"not an image")),
        ("file", ("c.png", IMAGES[1])),
        ("file", ("d.jpg", header_only_jpeg())),
        ("file", ("e.png", IMAGES[2])),
    ]
    before = batch_histogram(server)
    response = post_captions(server, parts)
    after = batch_histogram(server)

    assert response.status_code == 200, response.text
    captions = response.json()["captions"]
    assert [c["filename"] for c in captions] == ["a.png", "b.txt", "c.png", "d.jpg", "e.png"]
    assert [c["status"] for c in captions] == [200, 415, 200, 415, 200]
    assert [captions[i]["caption"] for i in (0, 2, 4)] == [reference.caption(IMAGES[i]) for i in range(3)]
    assert "not a supported image" in captions[1]["error"] and "truncated" in captions[3]["error"]
    # The three valid images went to the model service in one call (the histogram counts calls).
    assert after["count"] - before.get("count", 0) == 1


def test_captions_equal_single_caption_token_for_token_with_options(server):
    form = {"prompt": "a photography of", "max_new_tokens": "8", "num_beams": "2"}
    many = post_captions(server, [("file", (f"{i}.png", data)) for i, data in enumerate(IMAGES)], form).json()
    singles = [post_caption(server, files={"file": ("p.png", data)}, data=form).json()["caption"] for data in IMAGES]
    assert [c["caption"] for c in many["captions"]] == singles


def test_a_part_over_the_image_limit_fails_alone(server, reference):
    parts = [("file", ("big.jpg", b"\xff\xd8" + b"\0" * (11 * 1024 * 1024))), ("file", ("ok.png", IMAGES[3]))]
    captions = post_captions(server, parts).json()["captions"]
    assert captions[0] == {
        "filename": "big.jpg",
        "caption": None,
        "error": "the image is larger than 10 MB",
        "status": 413,
    }
    assert captions[1]["caption"] == reference.caption(IMAGES[3])


@pytest.mark.parametrize("how", ["base64", "data url", "raw image/png", "raw application/octet-stream"])
def test_json_and_raw_bodies_give_the_multipart_caption(server, reference, how):
    data = IMAGES[4]
    text = base64.b64encode(data).decode()
    if how == "base64":
        response = httpx.post(f"{server.url}/caption", json={"image": text, "max_new_tokens": 12}, timeout=60)
    elif how == "data url":
        response = httpx.post(
            f"{server.url}/caption", json={"image": f"data:image/png;base64,{text}", "max_new_tokens": 12}
        )
    else:
        content_type = how.split()[1]
        response = httpx.post(
            f"{server.url}/caption", content=data, headers={"Content-Type": content_type}, params={"max_new_tokens": 12}
        )
    assert response.status_code == 200, response.text
    assert response.json() == {"caption": reference.caption(data, max_new_tokens=12)}


def test_jpeg_draft_setting_reaches_the_decoder(tiny_model_dir, tmp_path):
    from tools.servers import bento_server

    photo = encode(scene(31, (4032, 3024)), "JPEG", quality=90)
    with bento_server({"BLIP_MODEL": tiny_model_dir, "BLIP_JPEG_DRAFT": "true"}, tmp_path / "draft.log") as drafted:
        response = post_caption(drafted, files={"file": ("phone.jpg", photo)}, headers={"X-Request-ID": "draft-1"})
    log = drafted.log_text()  # after the stop: the access line follows the response
    assert response.status_code == 200, response.text
    # The tiny model takes 64 px: libjpeg's 1/8 scale (504x378) still covers it.
    assert "request_id=draft-1" in log and "image=504x378" in log


def test_gpu_decode_setting_sends_baseline_jpegs_to_the_model(tiny_model_dir, tmp_path, reference):
    """BLIP_GPU_DECODE on a CPU: the model process decodes (Pillow) and resizes (torch) a baseline
    JPEG; anything else, and every error, takes the API's path as before."""
    import numpy as np
    from PIL import Image

    from blip_serve.model.device_images import DeviceJpegs
    from tools.servers import bento_server

    jpeg = encode(scene(32, (640, 480)), "JPEG", quality=90)
    png = encode(scene(33), "PNG")
    settings = {"BLIP_MODEL": tiny_model_dir, "BLIP_PRECISION": "fp32", "BLIP_GPU_DECODE": "true"}  # as the reference
    with bento_server(settings, tmp_path / "gpu-decode.log") as served:
        info = httpx.get(f"{served.url}/info").json()
        answers = [
            post_caption(served, files={"file": (name, data)}) for name, data in [("a.jpg", jpeg), ("b.png", png)]
        ]
        truncated = post_caption(served, files={"file": ("c.jpg", jpeg[: len(jpeg) // 2])})
        batch = post_captions(served, [("file", ("a.jpg", jpeg)), ("file", ("b.png", png))])

    assert info["jpeg_decoder"] == "pillow"
    device_pixels = DeviceJpegs("cpu", 64, 64)([jpeg])[0].numpy()
    expected_jpeg = reference.caption_image(Image.fromarray(np.ascontiguousarray(device_pixels.transpose(1, 2, 0))))
    assert [a.json()["caption"] for a in answers] == [expected_jpeg, reference.caption(png)]
    assert [c["caption"] for c in batch.json()["captions"]] == [expected_jpeg, reference.caption(png)]
    assert (
        truncated.status_code == 415 and "not a complete, valid image" in truncated.json()["error"]
    )  # the API decoded it


@pytest.mark.parametrize("library", ["httpx", "aiohttp"])
def test_the_readmes_python_examples_run_as_written(server, reference, library):
    """Each README example, against this server: the aiohttp one once never called its main()."""
    import re
    import subprocess
    import sys

    from tools.servers import REPO

    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    code = next(block for block in blocks if block.startswith(f"import {library}") or f", {library}" in block[:40])
    result = subprocess.run(
        [sys.executable, "-c", code.replace("http://127.0.0.1:3000", server.url)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    expected = reference.caption((REPO / "examples" / "sample.jpg").read_bytes())
    assert expected in result.stdout and result.stdout.count(expected) == (8 if library == "aiohttp" else 1)
