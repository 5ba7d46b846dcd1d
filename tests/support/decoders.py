"""The decode processes' settings the tests start them with: the server's limits, budgets wide
enough that only a test that means to hit one does."""

from __future__ import annotations

from PIL import Image

from blip_serve.decoding.child import DecodeConfig
from blip_serve.decoding.images import LARGE_IMAGE_PIXELS

CONFIG = DecodeConfig(
    max_pixels=40_000_000,
    max_side=12_000,
    width=384,
    height=384,
    resample=int(Image.Resampling.BICUBIC),
    jpeg_draft=False,
    cpu_s=30.0,
    memory_mb=2048,
    large_pixels=LARGE_IMAGE_PIXELS,
)


def config(**changes) -> DecodeConfig:
    return DecodeConfig(**{**CONFIG.__dict__, **changes})
