"""Test images, made here (no downloads): varied content, sizes and modes, encoded as uploads."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def scene(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A smooth gradient with a few coloured shapes: photo-like enough that captions differ."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-1.5, 1.5, (3, 2))
    pixels = np.stack([base[c] + slope[c, 0] * x + slope[c, 1] * y for c in range(3)], axis=-1)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(2, max(3, width // 2)), y0 + rng.integers(2, max(3, height // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def animated_gif(seed: int) -> bytes:
    frames = [scene(seed), scene(seed + 100), scene(seed + 200)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def upload_corpus() -> dict[str, bytes]:
    """Every accepted format and a spread of modes and sizes: name -> file bytes."""
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
