"""decode_image without a server: every accepted kind of upload, and every refusal."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from blip_serve.errors import BadRequest, PayloadTooLarge, UnsupportedImage
from blip_serve.images import decode_image
from images import encode, scene, upload_corpus

LIMIT = 40_000_000


@pytest.mark.parametrize("name", sorted(upload_corpus()))
def test_every_accepted_upload_decodes_to_rgb(name):
    data = upload_corpus()[name]
    image = decode_image(data, LIMIT)
    assert image.mode == "RGB"
    assert image.size == Image.open(io.BytesIO(data)).size


def test_transparency_goes_onto_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    image = decode_image(encode(rgba, "PNG"), LIMIT)
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_palette_transparency_goes_onto_white():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    data = encode(palette, "PNG", transparency=0)
    assert decode_image(data, LIMIT).getpixel((1, 1)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16), "I;16")
    value = decode_image(encode(grey, "PNG"), LIMIT).getpixel((0, 0))
    assert value[0] == value[1] == value[2] and 120 <= value[0] <= 135


def test_exif_orientation_is_applied():
    # Stored 40 wide and 20 high with "rotate 90" in EXIF: shown (and captioned) 20 wide, 40 high.
    image = scene(1, (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(encode(image, "JPEG", exif=exif), LIMIT)
    assert decoded.size == (20, 40)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    red, green, blue = decode_image(data, LIMIT).getpixel((4, 4))
    assert red > 200 and blue < 50


def test_empty_upload_is_a_bad_request():
    with pytest.raises(BadRequest, match="empty"):
        decode_image(b"", LIMIT)


@pytest.mark.parametrize(
    "data",
    [
        b"just some text",
        b"<!doctype html><html><body>hi</body></html>",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
        b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
        b"\x00" * 64,
    ],
    ids=["text", "html", "svg", "pdf", "zeros"],
)
def test_non_images_are_unsupported(data):
    with pytest.raises(UnsupportedImage, match="not a supported image"):
        decode_image(data, LIMIT)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_unsupported(fmt):
    data = encode(scene(2, (300, 200)), fmt)
    with pytest.raises(UnsupportedImage):
        decode_image(data[: len(data) // 2], LIMIT)


def test_corrupt_png_chunk_is_unsupported():
    data = bytearray(encode(scene(3), "PNG"))
    start = data.index(b"IDAT") + 20
    data[start : start + 50] = b"\xff" * 50
    with pytest.raises(UnsupportedImage):
        decode_image(bytes(data), LIMIT)


def test_ico_is_refused_although_pillow_reads_it():
    with pytest.raises(UnsupportedImage):
        decode_image(encode(scene(4, (32, 32)), "ICO"), LIMIT)


def test_more_pixels_than_the_limit_is_too_large():
    bomb = encode(Image.new("L", (12_000, 10_000)), "PNG")  # 120 megapixels in ~100 KB
    assert len(bomb) < 1_000_000
    with pytest.raises(PayloadTooLarge, match="12000x10000"):
        decode_image(bomb, LIMIT)
