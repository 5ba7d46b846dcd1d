"""A cheap pass over an upload's structure before Pillow parses it.

Pillow's parsers do Python work per JPEG segment, PNG chunk, GIF sub-block and TIFF tag, some of it
quadratic, and they trust what metadata claims: twenty directory entries may all point at the same
blob, and each becomes its own copy. This module walks the same structures with linear, C-speed
scans and stops at the first count no camera or editor writes, so that what Pillow is handed
costs it little. Each refusal says what was wrong.

    check_structure(data)   by the file's magic bytes: JPEG, PNG, GIF, TIFF, WebP, BMP
    check_exif(blob)        an EXIF block, wherever Pillow found it (JPEG, PNG, WebP)

What a file may still cost after this pass (CPU, memory) is bounded by the decode process's
budgets (decoding/child.py); these rules make the common attacks cheap to refuse and their
messages clear.
"""

from __future__ import annotations

import re
import struct

from blip_serve.shared.errors import PayloadTooLarge, UnsupportedImage

MAX_JPEG_SEGMENTS = 1000  # marker segments in the first image (a camera writes ~20)
MAX_JPEG_SCANS = 100  # progressive scans: encoders write 10 or so; each is a pass over every block
MAX_PNG_CHUNKS = 20_000  # a 64 MB PNG in libpng's 8 KB data chunks is ~8,000
MAX_PNG_METADATA_CHUNKS = 500  # chunks other than image data
MAX_GIF_BLOCKS = 1000  # extension sub-blocks before the first frame (a comment: a few)
MAX_WEBP_CHUNKS = 20_000  # an animation's frames are chunks
MAX_DIRECTORY_ENTRIES = 1000  # tags in all of a TIFF's or an EXIF block's directories (cameras: ~100)
MAX_DIRECTORIES = 16  # walked (a TIFF's pages are directories too)
DEFLATE_MAX_RATIO = 1032  # no deflate stream inflates more than this

ARITHMETIC_FRAMES = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# A marker inside a JPEG scan: 0xFF then a byte that is not a stuffed zero, a restart or fill.
SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def refuse(message: str) -> UnsupportedImage:
    return UnsupportedImage(message + ": send an image as a camera or editor saves it")


def check_structure(data: bytes) -> None:
    """Raise UnsupportedImage or PayloadTooLarge for a file whose structure is out of bounds."""
    try:
        check_by_format(data)
    except (struct.error, IndexError):  # a length or offset that runs off the end
        raise UnsupportedImage("the file's structure is corrupt: send an uncorrupted image") from None


def check_by_format(data: bytes) -> None:
    if data.startswith(b"\xff\xd8"):
        check_jpeg(data)
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        check_png(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        check_gif(data)
    elif data[:4] in (b"II*\x00", b"MM\x00*"):
        check_tiff(data)
    elif data[:4] in (b"II+\x00", b"MM\x00+"):
        raise UnsupportedImage("BigTIFF files are not accepted: save the image as a plain TIFF, PNG or JPEG")
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        check_webp(data)
    elif data.startswith(b"BM"):
        check_bmp(data)


def check_jpeg(data: bytes) -> None:
    """Segments and scans of the first image (an MPO's other frames are never decoded)."""
    position, segments, scans, frame, exif_blocks = 2, 0, 0, None, 0
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise refuse("the JPEG's marker structure is corrupt")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xD9:  # end of image
            break
        (length,) = struct.unpack_from(">H", data, position + 2)
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise refuse(f"the JPEG has more than {MAX_JPEG_SEGMENTS} marker segments")
        payload = data[position + 4 : position + 2 + length]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header
            if marker in ARITHMETIC_FRAMES:
                raise UnsupportedImage("arithmetic-coded JPEGs are not accepted: save the image as a baseline JPEG")
            if len(payload) >= 5:
                height, width = struct.unpack_from(">HH", payload, 1)
                frame = (width, height)
        elif marker == 0xE1 and payload.startswith(b"Exif\x00\x00"):
            exif_blocks += 1
            if exif_blocks > 1:  # Pillow joins them, copying each time
                raise refuse("the JPEG has more than one EXIF segment")
        elif marker == 0xE2 and payload.startswith(b"MPF\x00"):
            check_directories(payload[4:], "the JPEG's multi-picture index")  # Pillow reads it on open
        elif marker == 0xDA:  # start of scan: the entropy-coded data runs to the next marker
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise refuse(f"the JPEG has more than {MAX_JPEG_SCANS} scans")
            start = position + 2 + length
            found = SCAN_END.search(data, start)
            end = found.start() if found else len(data)
            if scans == 1 and frame:
                check_first_scan(end - start, *frame)
            position = end
            continue
        position += 2 + length
    if frame is None:
        raise UnsupportedImage("the JPEG has no frame header: send the complete file")
    if scans == 0:
        raise UnsupportedImage(
            f"the JPEG is truncated: it declares {frame[0]}x{frame[1]} pixels but holds no image data"
        )


def check_first_scan(scan_bytes: int, width: int, height: int) -> None:
    """libjpeg pads a scan that ends early with grey and reports success, so a few hundred bytes
    could claim 36 megapixels. Huffman coding spends at least one bit per 8x8 block of a scan
    (arithmetic coding, which has no such floor, is refused above)."""
    blocks = -(-width // 8) * -(-height // 8)
    if scan_bytes * 8 < blocks:
        raise truncated("JPEG", width, height)


def truncated(kind: str, width: int, height: int) -> UnsupportedImage:
    return UnsupportedImage(
        f"the {kind} is truncated: it declares {width}x{height} pixels but holds too little data "
        "for them; send the complete file"
    )


PNG_SAMPLES_PER_PIXEL = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type


def check_png(data: bytes) -> None:
    position, chunks, metadata, image_bytes, header = 8, 0, 0, 0, None
    while position + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise refuse(f"the PNG has more than {MAX_PNG_CHUNKS:,} chunks")
        start = position + 8
        if kind == b"IHDR" and length >= 13 and start + 13 <= len(data):
            header = struct.unpack_from(">IIBB", data, start)
        elif kind == b"IDAT":
            image_bytes += min(length, len(data) - start)  # what is there, not what the length claims
        elif kind == b"IEND":
            break
        elif kind != b"fdAT":  # an animation's frames are image data too
            metadata += 1
            if metadata > MAX_PNG_METADATA_CHUNKS:
                raise refuse(f"the PNG has more than {MAX_PNG_METADATA_CHUNKS} metadata chunks")
            if kind == b"eXIf":
                check_exif(data[start : start + length])
        position += 12 + length
    if header:
        width, height, depth, colour = header
        raw = height * -(-width * depth * PNG_SAMPLES_PER_PIXEL.get(colour, 4) // 8)
        if image_bytes * DEFLATE_MAX_RATIO + 4096 < raw:
            raise truncated("PNG", width, height)


def check_gif(data: bytes) -> None:
    """The blocks before the first frame: extensions are chains of sub-blocks of up to 255 bytes,
    and Pillow joins a comment's one at a time."""
    position = 13
    if len(data) > 10 and data[10] & 0x80:  # a global colour table
        position += 3 * 2 ** ((data[10] & 7) + 1)
    blocks = 0
    while position < len(data) and data[position] == 0x21:  # an extension
        position += 2
        while position < len(data) and data[position]:
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise refuse(f"the GIF has more than {MAX_GIF_BLOCKS} metadata blocks before its first frame")
            position += 1 + data[position]
        position += 1


def check_tiff(data: bytes) -> None:
    """The directories Pillow reads (the first; EXIF's, when it rotates), and the geometry of tiles
    and strips against the image's."""
    tags = check_directories(data, "the TIFF")
    width, height = tags.get(256, 0), tags.get(257, 0)
    tile_width, tile_height = tags.get(322, 0), tags.get(323, 0)
    if tile_width > round_up(width, 16) or tile_height > round_up(height, 16):
        raise refuse(f"the TIFF's {tile_width}x{tile_height} tiles are larger than its {width}x{height} image")


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def check_webp(data: bytes) -> None:
    position, chunks = 12, 0
    while position + 8 <= len(data):
        kind, length = struct.unpack_from("<4sI", data, position)
        chunks += 1
        if chunks > MAX_WEBP_CHUNKS:
            raise refuse(f"the WebP has more than {MAX_WEBP_CHUNKS:,} chunks")
        if kind == b"EXIF":
            check_exif(data[position + 8 : position + 8 + length])
        position += 8 + length + (length & 1)


def check_bmp(data: bytes) -> None:
    if len(data) >= 34 and struct.unpack_from("<I", data, 30)[0] in (1, 2):
        # Pillow decodes RLE in Python, a byte at a time; no camera or editor writes it today.
        raise UnsupportedImage("RLE-compressed BMPs are not accepted: send PNG or an uncompressed BMP")


def check_exif(blob: bytes) -> None:
    """An EXIF block as Pillow stores it (with or without its "Exif\\0\\0" prefix)."""
    if blob.startswith(b"Exif\x00\x00"):
        blob = blob[6:]
        if blob.startswith(b"Exif\x00\x00"):  # Pillow strips the prefix six bytes at a time
            raise refuse("the EXIF block repeats its header")
    if blob[:4] in (b"II*\x00", b"MM\x00*"):
        try:
            check_directories(blob, "the EXIF block")
        except (struct.error, IndexError):
            raise UnsupportedImage("the image's EXIF block is corrupt: send the image without it") from None


TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
SUB_DIRECTORIES = (0x8769, 0x8825, 0xA005, 0x014A)  # EXIF, GPS, interoperability, sub-IFDs
NUMERIC_TAGS = (256, 257, 322, 323)  # width, height, tile width, tile length


def check_directories(blob: bytes, what: str) -> dict[int, int]:
    """Walk a TIFF structure (a TIFF file, an EXIF block, an MPF index): its directories, their
    entries and the bytes each entry's value claims. Entries that claim more bytes, together,
    than the block holds share their data: parsed, each would be its own copy. Returns the first
    directory's single-valued numeric tags that the TIFF check needs."""
    if blob[:4] not in (b"II*\x00", b"MM\x00*") or len(blob) < 8:
        return {}
    order = "<" if blob[:2] == b"II" else ">"
    pending, seen, entries, claimed, first = [struct.unpack_from(order + "I", blob, 4)[0]], set(), 0, 0, {}
    while pending:
        offset = pending.pop()
        if offset in seen or offset < 8 or offset + 2 > len(blob):
            continue  # Pillow stops at a loop or a bad offset, and so do we
        if len(seen) == MAX_DIRECTORIES:  # Pillow reads the first; a multi-page TIFF has more
            break
        seen.add(offset)
        (count,) = struct.unpack_from(order + "H", blob, offset)
        entries += count
        if entries > MAX_DIRECTORY_ENTRIES:
            raise refuse(f"{what} has more than {MAX_DIRECTORY_ENTRIES} metadata entries")
        for index in range(count):
            at = offset + 2 + 12 * index
            if at + 12 > len(blob):
                break
            tag, kind, values, value = struct.unpack_from(order + "HHII", blob, at)
            size = TYPE_SIZES.get(kind, 0) * values
            if size > 4 and value + size <= len(blob):  # held elsewhere in the block
                claimed += size
            if tag in SUB_DIRECTORIES and values == 1:
                pending.append(value)
            if len(seen) == 1 and tag in NUMERIC_TAGS and values == 1 and kind in (3, 4):
                first[tag] = value >> 16 if kind == 3 and order == ">" else value & (0xFFFF if kind == 3 else ~0)
        if offset + 2 + 12 * count + 4 <= len(blob):
            pending.append(struct.unpack_from(order + "I", blob, offset + 2 + 12 * count)[0])
    if claimed > len(blob):
        raise PayloadTooLarge(
            f"{what}'s metadata entries claim {claimed:,} bytes but it holds {len(blob):,}: "
            "entries that share their data would each be copied; send the image without that metadata"
        )
    return first
