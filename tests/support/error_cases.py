"""Every error a client can cause with what it sends to /caption: the request, the status it gets
and words its message must hold. The contract tests send each to the real server; the hostile-input
tests use them as a corpus too."""

from __future__ import annotations

from PIL import Image

from support import hostile
from support.images import encode, header_only_jpeg, upload_corpus

JPEG = upload_corpus()["photo.jpg"]
ERROR_CASES = {
    # name: (files, data, status, words in the message)
    "no body": (None, None, 400, "missing form field 'file'"),
    "wrong field name": ({"image": ("p.jpg", JPEG)}, None, 400, "missing form field 'file'"),
    "empty file": ({"file": ("p.jpg", b"")}, None, 400, "empty"),
    "text where a file belongs": (None, {"file": "hello"}, 400, "must be an uploaded file"),
    "url where a file belongs": (None, {"file": "http://127.0.0.1:9/cat.jpg"}, 400, "must be an uploaded file"),
    "two file parts": ([("file", ("a.jpg", JPEG)), ("file", ("b.jpg", JPEG))], None, 400, "exactly one"),
    "plain text": ({"file": ("a.txt", b"hello there")}, None, 415, "not a supported image"),
    "html": ({"file": ("a.html", b"<html><body>x</body></html>")}, None, 415, "not a supported image"),
    "svg": ({"file": ("a.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>')}, None, 415, "not a supported image"),
    "pdf": ({"file": ("a.pdf", b"%PDF-1.4\n%%EOF")}, None, 415, "not a supported image"),
    "truncated jpeg": ({"file": ("a.jpg", JPEG[: len(JPEG) // 2])}, None, 415, "not a complete, valid image"),
    "header-only jpeg": ({"file": ("h.jpg", header_only_jpeg())}, None, 415, "truncated"),
    "pixel bomb": ({"file": ("b.png", encode(Image.new("L", (12000, 10000)), "PNG"))}, None, 413, "pixels"),
    "side over the limit": ({"file": ("s.png", encode(Image.new("L", (13000, 1000)), "PNG"))}, None, 413, "no side"),
    # Structures no camera or editor writes (blip_serve/decoding/file_checks.py; tests/unit/decoding/test_file_checks.py)
    "arithmetic-coded jpeg": ({"file": ("a.jpg", hostile.arithmetic_jpeg())}, None, 415, "arithmetic-coded"),
    "header-only mpo": ({"file": ("m.jpg", hostile.header_only_mpo())}, None, 415, "truncated"),
    "rle bmp": ({"file": ("r.bmp", hostile.bmp_rle8(600, 600))}, None, 415, "RLE-compressed"),
    "empty scans": ({"file": ("s.jpg", hostile.empty_scans(200, (256, 256)))}, None, 415, "more than 100 scans"),
    "exif entries sharing a blob": (
        {"file": ("e.png", hostile.amplified_exif("PNG", entries=500, blob_bytes=200_000))},
        None,
        413,
        "claim 100,000,000 bytes",
    ),
    "prompt + max_new_tokens over the positions": (
        {"file": ("p.jpg", JPEG)},
        {"prompt": "dog " * 40, "max_new_tokens": "100"},
        400,
        "positions",
    ),
    "max_new_tokens too large": ({"file": ("p.jpg", JPEG)}, {"max_new_tokens": "100000"}, 400, "max_new_tokens"),
    "max_new_tokens not a number": ({"file": ("p.jpg", JPEG)}, {"max_new_tokens": "many"}, 400, "max_new_tokens"),
    "num_beams zero": ({"file": ("p.jpg", JPEG)}, {"num_beams": "0"}, 400, "num_beams"),
    "prompt too long": ({"file": ("p.jpg", JPEG)}, {"prompt": "a" * 1000}, 400, "prompt"),
}
