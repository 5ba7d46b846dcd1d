"""BLIP_GPU_DECODE: JPEGs decoded, resized and normalised where the model runs.

The API service checks each upload's structure and header as always (decoding/child.py), and for a
baseline JPEG forwards the compressed bytes (a 640x480 photo: ~65 KB instead of 442 KB of pixels)
instead of decoding it. Here, in the model process, a batch's JPEGs are decoded together: with
nvJPEG on a GPU (torchvision.io.decode_jpeg on a list), with Pillow on a CPU. The resize is
torch's antialiased bicubic on the device, rounded to uint8 like Pillow's, then the same lookup
normalisation as the exact path (model.PixelNormalizer).

Not bit-exact: Pillow resizes in fixed point, one direction after the other, and nvJPEG upsamples
chroma its own way, so a pixel can differ by a few levels; the README gives how often the captions
still equal the exact path's.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Decoded together: a batch's JPEGs up to this many pixels at once (~190 MB of uint8 RGB).
PIXELS_PER_DECODE = 64_000_000


class UndecodableJpeg(ValueError):
    """A JPEG whose header passed the API's checks but whose data does not decode."""


def nvjpeg_decoder(device: str) -> Callable[[list[bytes]], list[torch.Tensor]]:
    """torchvision's batched nvJPEG decode onto `device`. Raises ImportError without torchvision."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(jpegs: list[bytes]) -> list[torch.Tensor]:
        data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    return decode


def pillow_decode(jpegs: list[bytes]) -> list[torch.Tensor]:
    """The CPU's decoder: libjpeg-turbo through Pillow, as (3, H, W) uint8 tensors."""
    images = []
    for jpeg in jpegs:
        with Image.open(io.BytesIO(jpeg), formats=["JPEG"]) as image:
            rgb = np.array(image.convert("RGB"))  # writable, as torch wants
        images.append(torch.from_numpy(rgb).permute(2, 0, 1))
    return images


class DeviceJpegs:
    """JPEG bytes -> (N, 3, H, W) uint8 on the device, at the model's input size."""

    def __init__(self, device: str, height: int, width: int):
        self.device = device
        self.size = (height, width)
        if device.startswith("cuda"):
            try:
                self.decode_many, self.decoder = nvjpeg_decoder(device), "nvjpeg"
            except ImportError as exc:
                raise RuntimeError(
                    "BLIP_GPU_DECODE=true on a GPU needs torchvision (the build that matches torch: "
                    "pip install torchvision==0.28.0)"
                ) from exc
        else:
            self.decode_many, self.decoder = pillow_decode, "pillow"

    def __call__(self, jpegs: list[bytes]) -> torch.Tensor:
        resized = torch.empty((len(jpegs), 3, *self.size), dtype=torch.uint8, device=self.device)
        for indices in chunks_by_pixels(jpegs):
            for index, image in zip(indices, self.decode([jpegs[i] for i in indices])):
                resized[index] = self.resize(image.to(self.device))
        return resized

    def decode(self, jpegs: list[bytes]) -> list[torch.Tensor]:
        """Raises UndecodableJpeg if any fails: the captioner splits the batch to find which."""
        try:
            return self.decode_many(jpegs)
        except Exception as exc:  # nvJPEG and libjpeg fail with their own types
            raise UndecodableJpeg("the JPEG's data does not decode: send an uncorrupted JPEG") from exc

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        """(3, h, w) uint8 -> (3, H, W) uint8: antialiased bicubic, as Pillow's filter, in float32."""
        if tuple(image.shape[1:]) == self.size:
            return image
        resized = F.interpolate(
            image.unsqueeze(0).to(torch.float32), size=self.size, mode="bicubic", antialias=True, align_corners=False
        )
        return resized.round_().clamp_(0, 255).to(torch.uint8)[0]


def chunks_by_pixels(jpegs: list[bytes]) -> list[list[int]]:
    """Indices of `jpegs` in groups whose declared pixels add up to at most PIXELS_PER_DECODE (one
    image alone may be larger): a batch of large photos does not decode all at once."""
    groups: list[list[int]] = [[]]
    total = 0
    for index, jpeg in enumerate(jpegs):
        pixels = declared_pixels(jpeg)
        if groups[-1] and total + pixels > PIXELS_PER_DECODE:
            groups.append([])
            total = 0
        groups[-1].append(index)
        total += pixels
    return groups


def declared_pixels(jpeg: bytes) -> int:
    with Image.open(io.BytesIO(jpeg), formats=["JPEG"]) as image:
        return image.width * image.height
