"""Hostile files, built in the test: one generator per class of attack on an image parser, each
with a size knob. None of these is a fixed sample: they build the structure an attacker would.

    quadratic parsing     exif_prefix_repeated, exif_segments, empty_app_segments, empty_png_chunks,
                          gif_comment_in_tiny_blocks
    metadata amplification  amplified_exif (in JPEG, PNG or WebP), amplified_tiff, mpf_index
    unbounded decode      empty_scans (progressive JPEG)
    check bypass          header_only_mpo, arithmetic_jpeg, truncated_png
    cost                  flat_png (16-bit grey, RGBA), tiff_one_big_tile, bmp_rle8
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image

from tools.sample_images import encode, scene

# The tags of directory entries the generators write: unknown to Pillow, so kept as raw values.
FIRST_PRIVATE_TAG = 0xC000


def small_jpeg(size: tuple[int, int] = (64, 48), **options) -> bytes:
    return encode(scene(3, size), "JPEG", quality=80, **options)


def insert_after_soi(jpeg: bytes, segments: bytes) -> bytes:
    return jpeg[:2] + segments + jpeg[2:]


def segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


# Quadratic parsing: Pillow's per-segment or per-block Python work grows with the square of the count.
def exif_prefix_repeated(total_bytes: int) -> bytes:
    """APP1 segments of "Exif\\0\\0" over and over: Pillow joins them, then strips the prefix six
    bytes at a time, copying the rest each time."""
    payload = b"Exif\x00\x00" * (65_000 // 6)
    return insert_after_soi(small_jpeg(), segment(0xE1, payload) * max(1, total_bytes // len(payload)))


def exif_segments(count: int) -> bytes:
    """Many tiny EXIF segments: Pillow appends each to the ones before (bytes +=)."""
    return insert_after_soi(small_jpeg(), segment(0xE1, b"Exif\x00\x00II*\x00") * count)


def empty_app_segments(count: int) -> bytes:
    return insert_after_soi(small_jpeg(), segment(0xE5, b"") * count)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def empty_png_chunks(count: int) -> bytes:
    png = encode(scene(4, (64, 48)), "PNG")
    return png[:33] + png_chunk(b"prVt", b"") * count + png[33:]  # after the 8-byte signature and IHDR


def truncated_png(side: int) -> bytes:
    """A side x side PNG whose image data is cut to its first 20 bytes, with valid chunks."""
    png = encode(Image.new("L", (side, side), 90), "PNG")
    (length,) = struct.unpack_from(">I", png, 33)
    assert png[37:41] == b"IDAT"
    return png[:33] + png_chunk(b"IDAT", png[41 : 41 + min(20, length)]) + png_chunk(b"IEND", b"")


def gif_comment_in_tiny_blocks(comment_bytes: int) -> bytes:
    """A GIF comment written as one-byte sub-blocks: Pillow concatenates them one by one."""
    gif = encode(scene(5, (32, 32)).convert("P", palette=Image.Palette.ADAPTIVE), "GIF")
    header_end = 13 + 3 * 2 ** ((gif[10] & 7) + 1)  # the screen descriptor and global color table
    comment = b"\x21\xfe" + b"\x01c" * comment_bytes + b"\x00"
    return gif[:header_end] + comment + gif[header_end:]


# Metadata amplification: many directory entries whose data is the same blob.
def directory(entries: list[tuple[int, int, int, int]], next_offset: int = 0) -> bytes:
    body = struct.pack("<H", len(entries))
    body += b"".join(struct.pack("<HHII", tag, kind, count, value) for tag, kind, count, value in entries)
    return body + struct.pack("<I", next_offset)


def amplified_directory(blob_bytes: int, entries: int, kind: int = 7) -> bytes:
    """A little-endian TIFF structure: `entries` tags (type `kind`) all pointing at one blob, and
    an orientation, so that Pillow rotates the image and rewrites (so reads) every tag."""
    size = {7: 1, 4: 4}[kind]
    blob_offset = 8 + 2 + 12 * (entries + 1) + 4
    tags = [(0x0112, 3, 1, 6)]
    tags += [(FIRST_PRIVATE_TAG + i, kind, blob_bytes // size, blob_offset) for i in range(entries)]
    return b"II*\x00" + struct.pack("<I", 8) + directory(tags) + bytes(blob_bytes)


def amplified_exif(fmt: str = "JPEG", entries: int = 2000, blob_bytes: int = 30_000, kind: int = 4) -> bytes:
    """An EXIF block where every entry claims the same bytes: parsed, it is entries x blob."""
    exif = b"Exif\x00\x00" + amplified_directory(blob_bytes, entries, kind)
    return encode(scene(6, (64, 48)), fmt, exif=exif)


def amplified_tiff(entries: int = 2000, blob_bytes: int = 100_000) -> bytes:
    """A real TIFF whose first directory also holds `entries` tags sharing one blob."""
    tiff = bytearray(encode(scene(7, (16, 16)), "TIFF"))
    (ifd,) = struct.unpack_from("<I", tiff, 4)
    (count,) = struct.unpack_from("<H", tiff, ifd)
    own = tiff[ifd + 2 : ifd + 2 + 12 * count]
    blob_offset = len(tiff)
    extra = b"".join(struct.pack("<HHII", FIRST_PRIVATE_TAG + i, 7, blob_bytes, blob_offset) for i in range(entries))
    new_ifd = blob_offset + blob_bytes
    tiff += bytes(blob_bytes) + struct.pack("<H", count + entries) + own + extra + struct.pack("<I", 0)
    struct.pack_into("<I", tiff, 4, new_ifd)
    return bytes(tiff)


def mpf_index(entries: int = 2000, blob_bytes: int = 30_000) -> bytes:
    """A JPEG with a multi-picture (MPF) index whose LONG tags share one blob: Pillow reads the
    index while opening the file, each value a Python int."""
    return insert_after_soi(small_jpeg(), segment(0xE2, b"MPF\x00" + amplified_directory(blob_bytes, entries, 4)))


# Unbounded decode: a progressive JPEG with an honest first scan, then scans with no data.
def empty_scans(scans: int, size: tuple[int, int] = (2000, 2000)) -> bytes:
    jpeg = encode(scene(8, size), "JPEG", quality=70, progressive=True)
    starts = [i for i in range(len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] == 0xDA]
    first_end = starts[1]
    # An AC scan header of the last scan (any one will do), repeated without entropy-coded data.
    last = starts[-1]
    (length,) = struct.unpack_from(">H", jpeg, last + 2)
    empty = jpeg[last : last + 2 + length]
    return jpeg[:first_end] + empty * scans + b"\xff\xd9"


# Check bypass: files that declare a large image and hold none of it.
def header_only_mpo(width: int = 6000, height: int = 6000) -> bytes:
    """A multi-picture JPEG cut after its first frame's headers, declaring width x height."""
    first = Image.new("RGB", (16, 16), (200, 0, 0))
    data = bytearray(encode(first, "MPO", save_all=True, append_images=[Image.new("RGB", (16, 16))]))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    scan = data.index(b"\xff\xda")
    (length,) = struct.unpack_from(">H", data, scan + 2)
    return bytes(data[: scan + 2 + length]) + b"\xff\xd9"


def arithmetic_jpeg(width: int = 6000, height: int = 6000) -> bytes:
    """An arithmetic-coded (SOF9) frame header and a scan header, no data."""
    frame = segment(0xC9, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
    quant = segment(0xDB, b"\x00" + bytes([1] * 64))
    scan = segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
    return b"\xff\xd8" + quant + frame + scan + b"\xff\xd9"


# Cost: small files that are large images in memory.
def flat_png(mode: str, side: int) -> bytes:
    if mode == "I;16":
        image = Image.fromarray(np.full((side, side), 30_000, dtype=np.uint16), "I;16")
    else:
        image = Image.new(mode, (side, side), (90, 120, 150, 128)[: len(mode)])
    return encode(image, "PNG", compress_level=9)


def tiff_one_big_tile(tile: int, size: int = 16) -> bytes:
    """A size x size grey TIFF stored as one tile x tile deflated tile: libtiff inflates the whole tile."""
    data = zlib.compress(bytes(tile * tile), 9)
    entries = [
        (256, 3, 1, size),  # width
        (257, 3, 1, size),  # height
        (258, 3, 1, 8),  # bits per sample
        (259, 3, 1, 8),  # deflate
        (262, 3, 1, 1),  # black is zero
        (277, 3, 1, 1),  # samples per pixel
        (322, 4, 1, tile),  # tile width
        (323, 4, 1, tile),  # tile length
        (324, 4, 1, 0),  # tile offset, set below
        (325, 4, 1, len(data)),  # tile byte count
    ]
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(entries) + 4
    entries[8] = (324, 4, 1, data_offset)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + directory(entries) + data


def bmp_rle8(width: int, height: int) -> bytes:
    """An RLE8 BMP whose every row is one pixel and an end-of-line escape: Pillow's decoder (Python)
    pads each row a byte at a time."""
    pixels = b"\x01\x07\x00\x00" * height + b"\x00\x01"
    palette = bytes(1024)
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels
