"""The API side of an image without a server: decode_image (every accepted kind of upload, every
refusal, the cost limits) and resize_image (equal to BLIP's image processor, bit for bit)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from blip_serve.decoding.images import ImageLimits, ResizeSpec, decode_image, prepare_image, resize_image
from blip_serve.shared.errors import BadRequest, PayloadTooLarge, UnsupportedImage
from support.images import encode, exif_with_orientation_and_an_oversized_short, header_only_jpeg, scene, upload_corpus

LIMIT = ImageLimits()


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
    with pytest.raises(PayloadTooLarge, match="12000x10000 pixels; the limit is 40,000,000"):
        decode_image(bomb, LIMIT)


@pytest.mark.parametrize("size", [(12_001, 100), (1, 12_001)])
def test_a_side_over_the_limit_is_too_large(size):
    with pytest.raises(PayloadTooLarge, match="no side may be over 12,000"):
        decode_image(encode(Image.new("L", size), "PNG"), LIMIT)


@pytest.mark.parametrize("size", [(4_000, 30), (12_000, 1), (1, 12_000), (12_000, 600)])
def test_banners_and_strips_within_the_side_limit_are_accepted(size):
    """No aspect-ratio limit: the side limit bounds a strip's resize (1x12,000: ~65 ms, ~34 MB)."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size[1], size[0]), dtype=np.uint8))
    prepared = prepare_image(encode(image, "PNG"), LIMIT, ResizeSpec())
    assert (prepared.width, prepared.height) == size and prepared.pixels.shape == (3, 384, 384)


def test_a_jpeg_whose_data_ends_after_its_header_is_truncated():
    data = header_only_jpeg()  # libjpeg alone would pad it to a grey 6000x6000 image
    assert len(data) < 1_000
    with pytest.raises(UnsupportedImage, match="truncated: it declares 6000x6000"):
        decode_image(data, LIMIT)


def test_flat_jpegs_pass_the_truncation_check():
    for quality in (5, 50, 95):
        for progressive in (False, True):
            data = encode(Image.new("L", (1024, 768)), "JPEG", quality=quality, progressive=progressive)
            assert decode_image(data, LIMIT).size == (1024, 768)  # even a flat image spends a bit a block


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_malformed_exif_is_a_client_error_not_a_crash(fmt):
    data = encode(scene(5, (64, 48)), fmt, exif=exif_with_orientation_and_an_oversized_short())
    with pytest.raises(UnsupportedImage, match="not a complete, valid image"):
        decode_image(data, LIMIT)


def test_resize_equals_blips_image_processor_bit_for_bit(tiny_model_dir):
    from transformers import BlipProcessor

    processor = BlipProcessor.from_pretrained(tiny_model_dir).image_processor
    spec = ResizeSpec.from_model_dir(tiny_model_dir)
    for name, data in upload_corpus().items():
        image = decode_image(data, LIMIT)
        expected = processor(images=image, return_tensors="np")["pixel_values"][0]
        pixels = resize_image(image, spec)
        assert pixels.dtype == np.uint8 and pixels.shape == (3, spec.height, spec.width)
        rescaled = processor.rescale(pixels, processor.rescale_factor, input_data_format="channels_first")
        normalized = processor.normalize(
            rescaled, processor.image_mean, processor.image_std, input_data_format="channels_first"
        )
        assert np.array_equal(normalized, expected), name


def test_jpeg_draft_decodes_large_photos_at_a_reduced_scale_never_below_the_model_size():
    photo = encode(scene(6, (3072, 2304)), "JPEG", quality=90)
    spec = ResizeSpec(width=384, height=384)
    exact = prepare_image(photo, LIMIT, spec)
    draft = prepare_image(photo, LIMIT, spec, jpeg_draft=True)
    assert (exact.width, exact.height) == (3072, 2304)
    assert (draft.width, draft.height) == (768, 576)  # 1/4: 1/8 would be 288 px high, under 384
    assert draft.pixels.shape == exact.pixels.shape == (3, 384, 384)
    assert not np.array_equal(draft.pixels, exact.pixels)  # why it is off by default
    png = encode(scene(6, (1200, 900)), "PNG")
    assert np.array_equal(
        prepare_image(png, LIMIT, spec, jpeg_draft=True).pixels, prepare_image(png, LIMIT, spec).pixels
    )
