"""Sample images made on the spot (no downloads): smooth gradients with coloured shapes, photo-like
enough that BLIP's captions differ from image to image. The load test's JPEGs also get a camera's
fine grain, so that a 640x480 one weighs (~62 KB) and decodes like a photo; the tests' images stay
smooth (small and quick to encode as PNG)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from blip_serve.formats import IMAGE_SUFFIXES


def scene(seed: int, size: tuple[int, int] = (160, 120), grain: bool = False) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-1.5, 1.5, (3, 2)) * 160 / max(width, height)
    pixels = np.stack([base[c] + slope[c, 0] * x + slope[c, 1] * y for c in range(3)], axis=-1)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(2, max(3, width // 2)), y0 + rng.integers(2, max(3, height // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    if not grain:
        return image
    noise = rng.normal(0, 8, (height, width, 1))  # without it a JPEG is a quarter of a photo's size
    grained = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(grained, "RGB").filter(ImageFilter.GaussianBlur(0.6))


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def sample_images(count: int = 16, size: tuple[int, int] = (640, 480)) -> list[tuple[str, bytes]]:
    """`count` JPEGs of a typical photo size: (name, bytes)."""
    return [(f"sample-{i:02d}.jpg", encode(scene(i, size, grain=True), "JPEG", quality=90)) for i in range(count)]


def load_images(
    folder: str | Path | None, count: int = 16, size: tuple[int, int] = (640, 480)
) -> list[tuple[str, bytes]]:
    """The images in `folder`, or generated samples of `size` when no folder is given."""
    if folder is None:
        return sample_images(count, size)
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return [(p.name, p.read_bytes()) for p in paths]


def write_samples(folder: str | Path, count: int = 8) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in sample_images(count):
        (folder / name).write_bytes(data)
    return folder
