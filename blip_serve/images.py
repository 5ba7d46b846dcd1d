"""Decode: uploaded bytes -> one upright RGB image, or a ClientError saying why not."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import BadRequest, PayloadTooLarge, UnsupportedImage

# Formats a client may send, by Pillow's name. Everything else (SVG, PDF, ICO, PSD ...) is refused
# before Pillow's other plugins look at the bytes.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED_TEXT = "JPEG, PNG, WebP, GIF, BMP or TIFF"

# Truncated files are errors, not half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Return the upload as an upright RGB image.

    Raises BadRequest (empty), UnsupportedImage (not an accepted image, or corrupt) or
    PayloadTooLarge (more than `max_pixels` pixels: a decompression bomb or just too big).
    """
    if not data:
        raise BadRequest("the 'file' field is empty: send an image (" + ACCEPTED_TEXT + ")")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns, then errors at 2x its limit; ours is stricter.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"the image is {width}x{height} pixels; the limit is {max_pixels:,} pixels"
                )
            image.seek(0)  # animated GIF/WebP: the first frame
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except PayloadTooLarge:
        raise
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"the image is too large to decode: {exc}") from None
    except UnidentifiedImageError:
        raise UnsupportedImage(f"the file is not a supported image: send {ACCEPTED_TEXT}") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError, ZeroDivisionError) as exc:
        # Pillow reports truncated or corrupt files through a wide range of exception types.
        raise UnsupportedImage(
            f"the image could not be decoded ({type(exc).__name__}: {exc}); send a complete "
            + ACCEPTED_TEXT
        ) from None


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
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(values.max(), 1.0)
        grey = np.clip(values / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")
