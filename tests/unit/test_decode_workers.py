"""blip_serve/decode_workers.py's rules without starting a decode process: the CPU budget for an
image's size, and a process that cannot start is the server's fault (503), not the upload's."""

from __future__ import annotations

import asyncio

import pytest

from blip_serve.decode_workers import Decoders
from support.decoders import CONFIG, config
from support.images import encode, scene


def test_the_cpu_budget_grows_with_the_pixels_from_one_second():
    budget = config(cpu_s=10.0).cpu_budget
    assert budget(40_000_000) == 10.0 and budget(12_000_000) == 3.0
    assert budget(4_000_000) == 1.0 and budget(100) == 1.0  # a small image that decodes slowly: 1 s
    assert config(cpu_s=0.2).cpu_budget(100) == 0.2


def test_a_decode_process_that_cannot_start_is_a_503_not_the_uploads_fault(monkeypatch):
    from blip_serve import decode_workers
    from blip_serve.errors import Unavailable

    monkeypatch.setattr(decode_workers.sys, "executable", "/bin/false")

    async def go():
        decoders = Decoders(CONFIG, 1, 1)
        try:
            with pytest.raises(Unavailable, match="could not start an image decoder") as caught:
                await decoders.prepare(encode(scene(1), "JPEG"), owner=1)
        finally:
            await decoders.close()
        return caught.value

    error = asyncio.run(go())
    assert error.status_code == 503 and error.headers == {"Retry-After": "5"}
