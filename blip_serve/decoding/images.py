"""The API side of an image: uploaded bytes -> upright RGB -> the model's input size, as uint8.

    open_image     bytes -> an opened image whose structure and size are within the limits
    decode_opened  -> upright RGB image; decode_image: both, or a ClientError saying why not
    resize_image   RGB image -> (3, H, W) uint8, exactly BLIP's image processor's resize
    prepare_image  all of it, for one upload

The decoding runs in the API worker's decode processes (child.py), with Pillow and numpy only: no
torch, no transformers. The API worker itself imports only the types (PreparedImage, ResizeSpec).
The model process does the rest of BLIP's preprocessing (rescale, normalize) on the uint8 array, so
four times fewer bytes cross between the processes than float32 would.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from blip_serve.decoding.file_checks import check_exif, check_structure
from blip_serve.formats import ACCEPTED_FORMATS, ACCEPTED_TEXT
from blip_serve.shared.errors import BadRequest, ClientError, PayloadTooLarge, UnsupportedImage
from blip_serve.shared.model_config import image_processor_config

# Truncated files are errors, not half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class ImageLimits:
    """What one upload may cost: pixels bound memory, the longest side bounds the resize (a
    1x12,000 strip costs ~65 ms and ~34 MB to resize to 384x384)."""

    max_pixels: int = 40_000_000
    max_side: int = 12_000

    def check(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise PayloadTooLarge(f"the image is {width}x{height} pixels; the limit is {self.max_pixels:,} pixels")
        if max(width, height) > self.max_side:
            raise PayloadTooLarge(f"the image is {width}x{height} pixels; no side may be over {self.max_side:,}")


# Over this many pixels an upload costs real time and memory to decode (a 12 MP photo: ~0.3 s of a
# core and ~50 MB): it is decoded in the low-priority pool (decoding/child.py).
LARGE_IMAGE_PIXELS = 4_000_000


@contextmanager
def pillow_errors():
    """Whatever Pillow, its codecs or EXIF parsing raise on an upload, as the client error it is."""
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns, then errors at 2x its limit; ours is stricter.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ClientError:
        raise
    except Image.DecompressionBombError:
        raise PayloadTooLarge("the image declares more pixels than the server decodes") from None
    except MemoryError:
        raise PayloadTooLarge("the image is too large to decode") from None
    except UnidentifiedImageError:
        raise UnsupportedImage(f"the file is not a supported image: send {ACCEPTED_TEXT}") from None
    except Exception:
        # The bytes are the cause (truncated, corrupt, malformed metadata); the exception's text is
        # Pillow's, not the client's.
        raise UnsupportedImage(
            "the file is not a complete, valid image: send an uncorrupted " + ACCEPTED_TEXT
        ) from None


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """The upload's structure checked (file_checks.py), its header read by Pillow and its size
    checked against `limits`; nothing decoded yet.

    Raises BadRequest (empty), UnsupportedImage (not an accepted image, or a structure no camera
    or editor writes) or PayloadTooLarge (over a limit).
    """
    if not data:
        raise BadRequest("the 'file' field is empty: send an image (" + ACCEPTED_TEXT + ")")
    check_structure(data)
    with pillow_errors():
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        limits.check(*image.size)
        return image


def decode_opened(image: Image.Image, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """An opened upload as an upright RGB image. With `draft_size`, a JPEG is decoded at the
    smallest of libjpeg's scales (1/2, 1/4, 1/8) that still covers that size: several times
    faster for large photos, but not the same pixels (BLIP_JPEG_DRAFT)."""
    with pillow_errors():
        if image.format in ("JPEG", "MPO") and draft_size:
            image.draft(None, draft_size)
        image.seek(0)  # animated GIF/WebP: the first frame
        image.load()
        check_exif_sources(image)
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of a big image
        return to_rgb(image)


def decode_image(data: bytes, limits: ImageLimits, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Bytes -> upright RGB image, or a ClientError saying why not (open_image, decode_opened)."""
    return decode_opened(open_image(data, limits), draft_size)


def device_decodable(image: Image.Image, data: bytes) -> bool:
    """Whether an opened upload (`data`, opened as `image`) can be decoded on the model's device
    (BLIP_GPU_DECODE): a complete baseline 8-bit JPEG in colour or grey, upright as stored. nvJPEG's
    batched decode takes these; the rest (PNG, WebP, CMYK, progressive, an EXIF rotation, an MPO, a
    cut-off file, whose error the API's decode words) is decoded here.

    Complete: open_image's structure pass has walked the file, and the image ends with its end
    marker, which entropy-coded data cannot hold (libjpeg decodes a cut file as grey, nvJPEG refuses
    it). A file with bytes after that marker takes the API's path too."""
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or image.info.get("progressive"):
        return False
    if not data.endswith(b"\xff\xd9"):
        return False
    with pillow_errors():
        check_exif_sources(image)
        return image.getexif().get(ORIENTATION, 1) == 1


ORIENTATION = 0x0112  # the EXIF tag


def check_exif_sources(image: Image.Image) -> None:
    """The EXIF block Pillow parses to find the orientation, wherever the file kept it."""
    if isinstance(image.info.get("exif"), bytes):
        check_exif(image.info["exif"])
    raw_profile = image.info.get("Raw profile type exif")  # PNG text: hex after three header lines
    if isinstance(raw_profile, str):
        check_exif(bytes.fromhex("".join(raw_profile.split("\n")[3:])))


# Conversions run a band of rows at a time: a 40 MP image needs one RGB copy, not several of
# RGBA or float64 (a 16-bit 40 MP PNG took ~1 GB converted whole).
BAND_ROWS = 256
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """Flatten any mode to RGB; transparency goes onto white, as viewers show it."""
    if image.mode == "RGB":
        return image
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        return onto_white(image)
    if image.mode in WIDE_GREY_MODES:
        return Image.fromarray(eight_bit_grey(image), "L").convert("RGB")
    return image.convert("RGB")


def onto_white(image: Image.Image) -> Image.Image:
    rgb = Image.new("RGB", image.size)
    for top in range(0, image.height, BAND_ROWS):
        band = image.crop((0, top, image.width, min(top + BAND_ROWS, image.height))).convert("RGBA")
        white = Image.new("RGBA", band.size, (255, 255, 255, 255))
        rgb.paste(Image.alpha_composite(white, band).convert("RGB"), (0, top))
    return rgb


def eight_bit_grey(image: Image.Image) -> np.ndarray:
    """16/32-bit greyscale scaled to 8 bits (not clipped, which would turn most of it white)."""
    values = np.asarray(image)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max(initial=0)), 1.0)
    grey = np.empty(values.shape, np.uint8)
    for row in range(0, values.shape[0], BAND_ROWS):
        band = values[row : row + BAND_ROWS].astype(np.float64)
        grey[row : row + BAND_ROWS] = np.clip(band / top * 255.0, 0, 255).astype(np.uint8)
    return grey


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


def resize_image(image: Image.Image, spec: ResizeSpec) -> np.ndarray:
    """RGB image -> (3, H, W) uint8: what BlipImageProcessor's resize gives, bit for bit (it also
    resizes with Pillow). Rescale and normalize follow in the model process."""
    resized = image.resize((spec.width, spec.height), resample=spec.resample, reducing_gap=None)
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))


@dataclass(frozen=True)
class PreparedImage:
    pixels: np.ndarray  # (3, H, W) uint8 at the model's input size; empty when `jpeg` is set
    width: int  # of the upload, upright
    height: int
    jpeg: bytes = b""  # the upload itself, for the model's device to decode (BLIP_GPU_DECODE)


def prepare_image(data: bytes, limits: ImageLimits, spec: ResizeSpec, jpeg_draft: bool = False) -> PreparedImage:
    """Decode and resize one upload, in this process (the server does it in child.py's
    processes). Width and height are the decoded image's (with jpeg_draft, a large JPEG's
    reduced decode)."""
    image = decode_image(data, limits, (spec.width, spec.height) if jpeg_draft else None)
    return PreparedImage(resize_image(image, spec), image.width, image.height)


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
