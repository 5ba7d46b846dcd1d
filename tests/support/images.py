"""Test images, made here (no downloads): varied content, sizes and modes, encoded as uploads."""

from __future__ import annotations

import functools
import struct

import numpy as np
from PIL import Image

from tools.sample_images import encode, scene  # noqa: F401  (tests import both from here)


def animated_gif(seed: int) -> bytes:
    frames = [scene(seed), scene(seed + 100), scene(seed + 200)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def upload_corpus() -> dict[str, bytes]:
    """Every accepted format and a spread of modes and sizes: name -> file bytes."""
    return dict(made_corpus())


@functools.cache
def made_corpus() -> dict[str, bytes]:
    return {
        "photo.jpg": encode(scene(1), "JPEG", quality=90),
        "photo.png": encode(scene(2), "PNG"),
        "photo.webp": encode(scene(3), "WEBP", lossless=True),
        "photo.gif": encode(scene(4).convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
        "animated.gif": animated_gif(5),
        "photo.bmp": encode(scene(6), "BMP"),
        "photo.tiff": encode(scene(7), "TIFF"),
        "wide.png": encode(scene(8, (640, 90)), "PNG"),
        "tall.jpg": encode(scene(9, (90, 500)), "JPEG"),
        "tiny.png": encode(scene(10, (8, 8)), "PNG"),
        "large.jpg": encode(scene(11, (1600, 1200)), "JPEG"),
        "grey.png": encode(scene(12).convert("L"), "PNG"),
        "rgba.png": encode(with_alpha(scene(13)), "PNG"),
        "cmyk.jpg": encode(scene(14).convert("CMYK"), "JPEG"),
        "palette.png": encode(scene(15).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "grey16.png": encode(grey16(16), "PNG"),
        "la.png": encode(with_alpha(scene(17)).convert("LA"), "PNG"),
    }


def with_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    alpha = Image.linear_gradient("L").resize(image.size)
    rgba.putalpha(alpha)
    return rgba


def grey16(seed: int) -> Image.Image:
    grey = np.asarray(scene(seed).convert("L"), dtype=np.uint16) * 257
    return Image.fromarray(grey.astype(np.uint16), "I;16")


def header_only_jpeg(width: int = 6000, height: int = 6000) -> bytes:
    """A few hundred bytes that claim `width` x `height` pixels: a JPEG's headers, the start of its
    scan, then an end-of-image marker. libjpeg pads the missing data with grey."""
    data = encode(Image.new("RGB", (width, height)), "JPEG", quality=10)
    start_of_scan = data.index(b"\xff\xda")
    return data[: start_of_scan + 200] + b"\xff\xd9"


def exif_with_orientation_and_an_oversized_short() -> bytes:
    """Orientation 6 (Pillow rotates, then re-encodes the EXIF) and ResolutionUnit, a SHORT tag,
    stored as a LONG of 70,000: re-encoding it raised struct.error out of exif_transpose."""
    entries = [(0x0112, 3, 1, 6), (0x0128, 4, 1, 70_000)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *entry) for entry in entries) + b"\0" * 4
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd
