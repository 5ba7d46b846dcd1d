"""Property-based fuzzing of the API side of an image (decode, then resize): random bytes, mutated
real images and crafted EXIF structures never raise anything but the project's own client errors."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blip_serve.decoding.images import ImageLimits, ResizeSpec, prepare_image
from blip_serve.shared.errors import ClientError
from support.images import encode, scene, upload_corpus

SEEDS = list(upload_corpus().values())
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = ImageLimits(max_pixels=4_000_000)
SPEC = ResizeSpec(width=64, height=64)


def prepare_or_client_error(data: bytes) -> None:
    try:
        image = prepare_image(data, LIMITS, SPEC)
    except ClientError:
        return
    assert image.pixels.shape == (3, 64, 64) and image.width * image.height <= 4_000_000


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    prepare_or_client_error(data)


@FUZZ
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=16)), min_size=1, max_size=8),
    cut=st.floats(0.05, 1.0),
)
def test_mutated_real_images(seed, edits, cut):
    data = bytearray(seed[: max(1, int(len(seed) * cut))])
    for where, patch in edits:
        start = int(where * (len(data) - 1))
        data[start : start + len(patch)] = patch
    prepare_or_client_error(bytes(data))


@FUZZ
@given(seed=st.sampled_from(SEEDS), header=st.binary(min_size=1, max_size=64))
def test_corrupted_headers(seed, header):
    prepare_or_client_error(header + seed[len(header) :])


ORIENTATION = 0x0112
TAGS = [ORIENTATION, 0x011A, 0x011B, 0x0128, 0x0132, 0x010F, 0x8769, 0x8825, 0x9286, 0xA001, 0x0201]
NUMBERS = st.one_of(st.integers(0, 16), st.integers(0, 2**32 - 1), st.sampled_from([2**31, 2**32 - 8, 2**16]))
COUNTS = st.one_of(st.just(1), NUMBERS)
TYPES = st.one_of(st.sampled_from([1, 2, 3, 4, 5, 7, 9, 10]), st.integers(0, 14))  # mostly valid TIFF types


@st.composite
def exif_blocks(draw) -> bytes:
    """A TIFF/EXIF block: either byte order, an IFD of entries with any tag, type (valid or not),
    count and value/offset, usually an orientation among them, a next-IFD offset and a tail."""
    order = draw(st.sampled_from(["<", ">"]))
    entries = draw(
        st.lists(
            st.tuples(st.sampled_from(TAGS) | st.integers(0, 0xFFFF), TYPES, COUNTS, NUMBERS),
            max_size=8,
        )
    )
    if draw(st.booleans()):
        value = draw(st.integers(2, 8) | st.integers(0, 0xFFFF))  # 2-8: Pillow rotates, rewriting the EXIF
        entries.insert(0, (ORIENTATION, 3, 1, value << 16 if order == ">" else value))  # a SHORT
    ifd = struct.pack(order + "H", len(entries))
    ifd += b"".join(struct.pack(order + "HHII", tag, kind, count, value) for tag, kind, count, value in entries)
    ifd += struct.pack(order + "I", draw(NUMBERS))
    header = (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(order + "I", 8)
    return b"Exif\x00\x00" + header + ifd + draw(st.binary(max_size=64))


@FUZZ
@given(exif=exif_blocks(), fmt=st.sampled_from(["JPEG", "PNG", "WEBP"]), size=st.sampled_from([(48, 32), (7, 50)]))
def test_crafted_exif_structures(exif, fmt, size):
    prepare_or_client_error(encode(scene(7, size), fmt, exif=exif))
