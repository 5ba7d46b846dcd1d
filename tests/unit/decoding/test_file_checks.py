"""blip_serve/decoding/file_checks.py: each class of hostile file, built here at several sizes, is refused
before Pillow parses it, quickly and with a message that says what was wrong; files as cameras,
editors and Pillow write them pass."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from blip_serve.decoding.file_checks import check_exif, check_structure
from blip_serve.decoding.images import ImageLimits, decode_image
from blip_serve.shared.errors import PayloadTooLarge, UnsupportedImage
from support import hostile
from support.images import encode, scene

# A refusal costs one linear pass over at most the upload limit (10 MB): far under this.
REFUSAL_SECONDS = 0.5

SIZES = [1, 10, 100]  # each generator's knob scaled from small to the upload limit

CLASSES = {
    # name: (generator at scale k, refusal, words in the message)
    "EXIF header repeated": (
        lambda k: hostile.exif_prefix_repeated(20_000 * k),
        UnsupportedImage,
        "more than one EXIF segment|EXIF block repeats its header",
    ),
    "many EXIF segments": (lambda k: hostile.exif_segments(1_000 * k), UnsupportedImage, "more than one EXIF"),
    "empty APP segments": (lambda k: hostile.empty_app_segments(26_000 * k), UnsupportedImage, "marker segments"),
    "empty PNG chunks": (lambda k: hostile.empty_png_chunks(8_700 * k), UnsupportedImage, "metadata chunks"),
    "GIF comment in 1-byte blocks": (
        lambda k: hostile.gif_comment_in_tiny_blocks(20_000 * k),
        UnsupportedImage,
        "metadata blocks",
    ),
    "EXIF entries sharing a blob (JPEG)": (
        lambda k: hostile.amplified_exif("JPEG", entries=min(900, 9 * k), blob_bytes=60_000 - 12 * min(900, 9 * k)),
        PayloadTooLarge,
        "entries claim",
    ),
    "EXIF entries sharing a blob (WebP)": (
        lambda k: hostile.amplified_exif("WEBP", entries=900, blob_bytes=10_000 * k),
        PayloadTooLarge,
        "entries claim",
    ),
    "too many EXIF entries (PNG)": (
        lambda k: hostile.amplified_exif("PNG", entries=1_000 + 30 * k, blob_bytes=4),
        UnsupportedImage,
        "metadata entries",
    ),
    "TIFF tags sharing a blob": (
        lambda k: hostile.amplified_tiff(entries=900, blob_bytes=10_000 * k),
        PayloadTooLarge,
        "entries claim",
    ),
    "MPF index sharing a blob": (
        lambda k: hostile.mpf_index(entries=min(900, 9 * k + 2), blob_bytes=40_000),
        PayloadTooLarge,
        "multi-picture index",
    ),
    "empty progressive scans": (lambda k: hostile.empty_scans(100 + 20 * k, (512, 512)), UnsupportedImage, "scans"),
    "header-only MPO": (lambda k: hostile.header_only_mpo(600 * (k % 10 + 1), 6000), UnsupportedImage, "truncated"),
    "arithmetic-coded JPEG": (lambda k: hostile.arithmetic_jpeg(60 * k, 6000), UnsupportedImage, "arithmetic"),
    "TIFF tile larger than the image": (lambda k: hostile.tiff_one_big_tile(128 * k), UnsupportedImage, "tiles"),
    "RLE BMP": (lambda k: hostile.bmp_rle8(60 * k, 60 * k), UnsupportedImage, "RLE"),
    "PNG too short for its pixels": (
        lambda k: hostile.truncated_png({1: 1000, 10: 3000, 100: 6000}[k]),
        UnsupportedImage,
        "too little data",
    ),
}


@pytest.mark.parametrize("scale", SIZES)
@pytest.mark.parametrize("name", CLASSES)
def test_each_class_is_refused_quickly_and_says_why(name, scale):
    build, refusal, words = CLASSES[name]
    data = build(scale)
    started = time.perf_counter()
    with pytest.raises(refusal, match=words):
        decode_image(data, ImageLimits())
    assert time.perf_counter() - started < REFUSAL_SECONDS, f"{len(data):,} bytes took too long to refuse"


def camera_exif() -> Image.Exif:
    """What a phone writes: IFD0 with make, model, orientation, dates; an EXIF sub-directory; GPS."""
    exif = Image.Exif()
    exif.update({0x010F: "Phone Maker", 0x0110: "Model 12", 0x0112: 6, 0x0131: "Camera 1.0", 0x0132: "2026:12:01"})
    exif.get_ifd(0x8769).update({0x9003: "2026:12:01 10:00:00", 0x829A: (1, 120), 0x8827: 100, 0x927C: bytes(2000)})
    exif.get_ifd(0x8825).update({1: "N", 2: (52.0, 31.0, 12.5), 3: "E", 4: (13.0, 24.0, 1.0)})
    return exif


def multipage_tiff(pages: int) -> bytes:
    frames = [scene(30 + i, (32, 24)) for i in range(pages)]
    return encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])


LEGITIMATE = {
    "jpeg with a phone's exif": lambda: encode(scene(1, (200, 150)), "JPEG", exif=camera_exif()),
    "progressive jpeg": lambda: encode(scene(2, (640, 480)), "JPEG", quality=95, progressive=True),
    "optimized jpeg with restart markers": lambda: encode(scene(3), "JPEG", optimize=True, restart_marker_rows=1),
    "flat grey jpeg": lambda: encode(Image.new("L", (2000, 1500), 128), "JPEG", quality=95),
    "mpo of two frames": lambda: encode(scene(4), "MPO", save_all=True, append_images=[scene(5)]),
    "png with exif and text": lambda: encode(scene(6), "PNG", exif=camera_exif(), pnginfo=png_text(40)),
    "flat png": lambda: hostile.flat_png("L", 3000),
    "webp with exif": lambda: encode(scene(8), "WEBP", exif=camera_exif()),
    "animated gif with a comment": lambda: encode(
        scene(9).convert("P"), "GIF", save_all=True, append_images=[scene(10).convert("P")], comment=b"x" * 5000
    ),
    "twenty-page tiff": lambda: multipage_tiff(20),
    "16-bit tiff": lambda: encode(Image.fromarray(np.full((40, 30), 40_000, dtype=np.uint16)), "TIFF"),
    "deflated tiff": lambda: encode(scene(11), "TIFF", compression="tiff_adobe_deflate"),
    "bmp": lambda: encode(scene(12), "BMP"),
}


def png_text(chunks: int):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for index in range(chunks):
        info.add_text(f"key{index}", "value " * 20, zip=index % 2 == 1)
    return info


@pytest.mark.parametrize("name", LEGITIMATE)
def test_files_as_cameras_and_editors_write_them_pass(name):
    data = LEGITIMATE[name]()
    check_structure(data)
    assert decode_image(data, ImageLimits()).mode == "RGB"


def test_metadata_entries_may_claim_exactly_what_the_block_holds():
    honest = hostile.amplified_directory(blob_bytes=4_000, entries=1)  # one entry, its own bytes
    check_exif(b"Exif\x00\x00" + honest)
    shared = hostile.amplified_directory(blob_bytes=4_000, entries=3)
    with pytest.raises(PayloadTooLarge, match="claim 12,000 bytes"):
        check_exif(b"Exif\x00\x00" + shared)


@pytest.mark.parametrize("cut", [10, 100, 1000])
def test_structures_that_run_off_the_end_are_corrupt_not_a_crash(cut):
    for data in (encode(scene(1), "JPEG", exif=camera_exif()), multipage_tiff(3), encode(scene(2), "WEBP")):
        try:
            check_structure(data[:cut])
        except UnsupportedImage:
            pass  # refused as corrupt; anything else (struct.error, IndexError) fails the test
