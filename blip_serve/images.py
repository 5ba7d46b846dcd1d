"""The API side of an image: uploaded bytes -> upright RGB -> the model's input size, as uint8.

    decode_image   bytes -> upright RGB image, or a ClientError saying why not
    resize_image   RGB image -> (3, H, W) uint8, exactly BLIP's image processor's resize
    prepare_image  both, for one upload

Runs in the API process with Pillow and numpy only: no torch, no transformers. The model process
does the rest of BLIP's preprocessing (rescale, normalize) on the uint8 array, so four times fewer
bytes cross between the processes than float32 would.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import BadRequest, ClientError, PayloadTooLarge, UnsupportedImage

# Formats a client may send, by Pillow's name. Everything else (SVG, PDF, ICO, PSD ...) is refused
# before Pillow's other plugins look at the bytes.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED_TEXT = "JPEG, PNG, WebP, GIF, BMP or TIFF"

# Truncated files are errors, not half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class ImageLimits:
    """What one upload may cost: pixels bound memory, sides and aspect ratio bound the resize."""

    max_pixels: int = 40_000_000
    max_side: int = 12_000
    max_aspect_ratio: float = 20.0

    def check(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise PayloadTooLarge(f"the image is {width}x{height} pixels; the limit is {self.max_pixels:,} pixels")
        if max(width, height) > self.max_side:
            raise PayloadTooLarge(f"the image is {width}x{height} pixels; no side may be over {self.max_side:,}")
        if max(width, height) > self.max_aspect_ratio * min(width, height):
            raise PayloadTooLarge(
                f"the image is {width}x{height} pixels; its long side may be at most "
                f"{self.max_aspect_ratio:g} times its short side: crop it"
            )


# Over this many pixels an upload costs real time and memory to decode (a 12 MP photo: ~0.3 s of a
# core and ~50 MB); the API service lets only a few such decodes run at once.
LARGE_IMAGE_PIXELS = 4_000_000


def declared_pixels(data: bytes) -> int:
    """Width x height as the file's header declares it, without decoding; 0 when unreadable."""
    try:
        width, height = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS).size
        return width * height
    except Exception:
        return 0


def decode_image(data: bytes, limits: ImageLimits, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Return the upload as an upright RGB image. With `draft_size`, a JPEG is decoded at the
    smallest of libjpeg's scales (1/2, 1/4, 1/8) that still covers that size: several times
    faster for large photos, but not the same pixels (BLIP_JPEG_DRAFT).

    Raises BadRequest (empty), UnsupportedImage (not an accepted image, truncated or corrupt) or
    PayloadTooLarge (over a limit of `limits`: a decompression bomb, or just too big).
    """
    if not data:
        raise BadRequest("the 'file' field is empty: send an image (" + ACCEPTED_TEXT + ")")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns, then errors at 2x its limit; ours is stricter.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            limits.check(*image.size)
            if image.format == "JPEG":
                check_jpeg_has_its_data(data, *image.size)
                if draft_size:
                    image.draft(None, draft_size)
            image.seek(0)  # animated GIF/WebP: the first frame
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of a big image
            return to_rgb(image)
    except ClientError:
        raise
    except Image.DecompressionBombError:
        raise PayloadTooLarge("the image declares more pixels than the server decodes") from None
    except MemoryError:
        raise PayloadTooLarge("the image is too large to decode") from None
    except UnidentifiedImageError:
        raise UnsupportedImage(f"the file is not a supported image: send {ACCEPTED_TEXT}") from None
    except Exception:
        # Whatever Pillow, its codecs or EXIF parsing raise on these bytes, the bytes are the cause
        # (truncated, corrupt, malformed metadata). The exception's text is Pillow's, not the client's.
        raise UnsupportedImage(
            "the file is not a complete, valid image: send an uncorrupted " + ACCEPTED_TEXT
        ) from None


def check_jpeg_has_its_data(data: bytes, width: int, height: int) -> None:
    """Refuse a JPEG whose first scan is too short to hold its pixels.

    libjpeg pads a scan that ends early (an EOI marker where data should be) with grey and reports
    success, so a few hundred bytes can claim 36 megapixels. With Huffman coding every 8x8 block
    of a scan costs at least one bit, which bounds how short an honest first scan can be.
    Arithmetic-coded JPEGs (rare) have no such bound and are not checked.
    """
    scan = first_scan_length(data)
    if scan is None:
        return
    blocks = -(-width // 8) * -(-height // 8)
    if scan * 8 < blocks:
        raise UnsupportedImage(
            f"the JPEG is truncated: it declares {width}x{height} pixels but holds too little data "
            "for them; send the complete file"
        )


HUFFMAN_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3}  # baseline, extended, progressive, lossless


def first_scan_length(data: bytes) -> int | None:
    """Bytes of entropy-coded data after the first SOS marker, or None when the frame is not
    Huffman-coded or the marker structure cannot be followed (Pillow judges those)."""
    position, huffman = 2, False
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            huffman = marker in HUFFMAN_FRAMES
        if marker == 0xDA:  # start of scan: its data runs to the next marker that is not a restart
            if not huffman:
                return None
            start = end = position + 2 + length
            while True:
                end = data.find(b"\xff", end)
                if end < 0 or end + 1 >= len(data):
                    return len(data) - start
                following = data[end + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:  # stuffed byte or restart marker
                    end += 2
                    continue
                return end - start
        position += 2 + length
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Flatten any mode to RGB; transparency goes onto white, as viewers show it."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit greyscale: scale to 8 bits rather than clip everything to white.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(values.max(), 1.0)
        grey = np.clip(values / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class ResizeSpec:
    """The resize step of BLIP's image processor, as the model directory configures it."""

    width: int = 384
    height: int = 384
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ResizeSpec:
        config = image_processor_config(model_dir)
        size = config.get("size", {})
        if not config.get("do_resize", True) or "height" not in size or "width" not in size:
            raise ValueError(f"{model_dir}: expected BLIP's fixed-size resize in its image processor config")
        return cls(width=size["width"], height=size["height"], resample=config.get("resample", cls.resample))


def image_processor_config(model_dir: str | Path) -> dict:
    """The image processor's settings: preprocessor_config.json (the hub's files), or the
    "image_processor" part of processor_config.json (what transformers 5 saves)."""
    model_dir = Path(model_dir)
    if (model_dir / "preprocessor_config.json").is_file():
        return json.loads((model_dir / "preprocessor_config.json").read_text())
    return json.loads((model_dir / "processor_config.json").read_text())["image_processor"]


def resize_image(image: Image.Image, spec: ResizeSpec) -> np.ndarray:
    """RGB image -> (3, H, W) uint8: what BlipImageProcessor's resize gives, bit for bit (it also
    resizes with Pillow). Rescale and normalize follow in the model process."""
    resized = image.resize((spec.width, spec.height), resample=spec.resample, reducing_gap=None)
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))


@dataclass(frozen=True)
class PreparedImage:
    pixels: np.ndarray  # (3, H, W) uint8 at the model's input size
    width: int  # of the upload, upright
    height: int


def prepare_image(data: bytes, limits: ImageLimits, spec: ResizeSpec, jpeg_draft: bool = False) -> PreparedImage:
    """Decode and resize one upload. Width and height are the decoded image's (with jpeg_draft, a
    large JPEG's reduced decode)."""
    image = decode_image(data, limits, (spec.width, spec.height) if jpeg_draft else None)
    return PreparedImage(resize_image(image, spec), image.width, image.height)


def lower_thread_priority() -> None:
    """Run the calling thread only on otherwise idle CPU time (Linux SCHED_IDLE, per thread), so that
    a large decode never takes a core from the model or from small requests. A lower nice value
    is not enough: the model's torch threads meet at a barrier in every operation, and a decode
    that holds one of their cores for a time slice stalls them all (measured on 2 cores: normal
    requests' p95 went from 0.2 s to 2 s with nice 10 beside 40 MP decodes). No-op elsewhere."""
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass


def return_freed_memory_to_os() -> None:
    """Make big frees go back to the OS at once.

    Pillow allocates a large image in 16 MB blocks. glibc serves blocks that size from its heaps
    once its adaptive mmap threshold has risen, and keeps them after they are freed: one big decode
    left an API worker gigabytes larger for good. A fixed threshold of 1 MB sends every large block
    through mmap, which returns it when freed. No-op where the C library is not glibc.
    """
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return
    libc = ctypes.CDLL(libc_name)
    if hasattr(libc, "mallopt"):
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 1024 * 1024)
