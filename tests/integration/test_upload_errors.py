"""Hostile and odd input against the real server: each gets a defined status and a JSON body (or a
caption where it is a valid image); afterwards the server is ready and its memory has not grown."""

from __future__ import annotations

import io

import httpx
import psutil
import pytest
from PIL import Image, ImageOps

from support.clients import post_caption, post_concurrently
from support.error_cases import ERROR_CASES
from support.images import encode, grey16, scene

pytestmark = pytest.mark.slow  # starts the real server


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 270": stored sideways, shown upright
    return encode(scene(21, (200, 120)), "JPEG", exif=exif)


def transparent_palette_png() -> bytes:
    image = scene(22).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


VALID = {
    "1x1": encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
    "4000x30 banner": encode(scene(25, (4000, 30)), "PNG"),  # no aspect-ratio limit (the seed server took it)
    "cmyk jpeg": encode(scene(23).convert("CMYK"), "JPEG"),
    "16-bit png": encode(grey16(24), "PNG"),
    "palette png with transparency": transparent_palette_png(),
    "exif-rotated jpeg": exif_rotated_jpeg(),
}


def server_memory(server) -> int:
    """Resident memory of every process of the server (supervisor, API and model workers)."""
    root = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


@pytest.mark.parametrize("name", VALID)
def test_odd_but_valid_images_are_captioned(server, reference, name):
    data = VALID[name]
    response = post_caption(server, files={"file": (name, data)})
    assert response.status_code == 200, response.text
    # The reference decodes with Pillow alone: exif_transpose, then convert("RGB") (on black for
    # transparency, where the server composites on white, so compare only where they must agree).
    if name not in ("palette png with transparency", "16-bit png"):
        upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        assert response.json()["caption"] == reference.caption_image(upright)


def test_exif_rotation_is_undone_before_captioning(server, reference):
    data = VALID["exif-rotated jpeg"]
    sideways = Image.open(io.BytesIO(data))
    upright = ImageOps.exif_transpose(sideways)
    assert upright.size == (120, 200)
    caption = post_caption(server, files={"file": ("r.jpg", data)}).json()["caption"]
    assert caption == reference.caption_image(upright)
    assert caption != reference.caption_image(sideways), "the test image must caption differently sideways"


def test_bad_requests_in_a_burst_never_fail_their_batch_mates(server, reference):
    """25 concurrent requests, 4 of them with a prompt whose tokens plus max_new_tokens pass the
    model's positions (before: an IndexError inside generate failed whole batches with 500)."""
    good = [encode(scene(500 + i), "PNG") for i in range(21)]
    overflow = {"prompt": "dog " * 40, "max_new_tokens": "100"}
    images = good[:5] + [good[0]] + good[5:10] + [good[1]] + good[10:15] + [good[2]] + good[15:] + [good[3]]
    fields = [overflow if i in (5, 11, 17, 24) else {} for i in range(25)]
    answers = post_concurrently(f"{server.url}/caption", images, fields=fields)

    bad = [answers[i] for i in (5, 11, 17, 24)]
    ok = [a for i, a in enumerate(answers) if i not in (5, 11, 17, 24)]
    assert [a.status for a in bad] == [400] * 4 and all("positions" in a.body["error"] for a in bad)
    assert [a.status for a in ok] == [200] * 21
    assert [a.body["caption"] for a in ok] == [reference.caption(data) for data in good]


def malformed_multipart(server, body: bytes, boundary: str = "b0undary") -> httpx.Response:
    return httpx.post(
        f"{server.url}/caption",
        content=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=60,
    )


MALFORMED = {
    "no closing boundary": b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\nabc',
    "garbage": b"\x00\xff" * 500,
    "part without headers": b"--b0undary\r\n\r\n\r\nzzz\r\n--b0undary--\r\n",
    "no boundary in header": None,
}


def test_a_body_cut_off_mid_upload_says_so(server):
    response = malformed_multipart(server, MALFORMED["no closing boundary"])
    assert response.status_code == 400
    assert response.json() == {
        "error": "the multipart body ended before its closing boundary: the upload was cut off; send the whole request"
    }


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_multipart_is_400(server, case):
    if MALFORMED[case] is None:
        response = httpx.post(
            f"{server.url}/caption", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"}
        )
    else:
        response = malformed_multipart(server, MALFORMED[case])
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"}


def test_huge_text_field_is_400(server):
    image = encode(scene(1), "PNG")
    response = post_caption(server, files={"file": ("p.png", image)}, data={"prompt": "a" * (2 * 1024 * 1024)})
    assert response.status_code == 400
    assert set(response.json()) == {"error"}


def test_a_local_path_in_the_file_field_is_not_read(server):
    response = post_caption(server, data={"file": "/etc/passwd"})
    assert response.status_code == 400
    assert "root:" not in response.text


def test_cors_is_off_by_default(server):
    preflight = httpx.options(
        f"{server.url}/caption", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_after_the_whole_corpus_the_server_is_ready_and_memory_is_flat(server, reference):
    corpus = [(files, data) for files, data, _, _ in ERROR_CASES.values()]
    corpus += [({"file": (name, data)}, None) for name, data in VALID.items()]
    for files, data in corpus:  # warm-up: first-use allocations are not leaks
        post_caption(server, files=files, data=data)
    before = server_memory(server)
    statuses = []
    for _ in range(3):
        for files, data in corpus:
            statuses.append(post_caption(server, files=files, data=data).status_code)
        for body in MALFORMED.values():
            if body:
                statuses.append(malformed_multipart(server, body).status_code)
    after = server_memory(server)
    assert max(statuses) < 500, statuses
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert after < before * 1.10, f"memory grew from {before >> 20} MB to {after >> 20} MB"
