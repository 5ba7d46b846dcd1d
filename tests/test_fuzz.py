"""Property-based fuzzing of decode_image: random bytes and mutated real images never raise anything
but the project's own client errors."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from blip_serve.errors import ClientError
from blip_serve.images import decode_image
from images import upload_corpus

SEEDS = list(upload_corpus().values())
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_or_client_error(data: bytes) -> None:
    try:
        image = decode_image(data, max_pixels=4_000_000)
    except ClientError:
        return
    assert image.mode == "RGB" and image.width * image.height <= 4_000_000


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    decode_or_client_error(data)


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
    decode_or_client_error(bytes(data))


@FUZZ
@given(seed=st.sampled_from(SEEDS), header=st.binary(min_size=1, max_size=64))
def test_corrupted_headers(seed, header):
    decode_or_client_error(header + seed[len(header) :])
