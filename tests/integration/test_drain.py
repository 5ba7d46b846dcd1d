"""SIGTERM to `bentoml serve` (what a rolling update, a scale-down or `docker compose stop` send to
the container's first process): every request already accepted is answered, /readyz turns 503 at
once, new requests are still served during the drain, and the server then exits by itself, having
run its shutdown (its workers' BentoML clients remove their folders from the temp folder)."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from support.clients import post_concurrently, wait_for_queue
from support.images import encode, scene
from tools.servers import bento_server

pytestmark = pytest.mark.slow  # starts the real server
DRAIN_S = 4


@pytest.fixture
def short_tmp():
    """A temp folder of the server's own, with a short path: BentoML puts its Unix sockets there."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="drain-") as folder:
        yield Path(folder)


def test_sigterm_answers_what_was_accepted_and_turns_readyz_503(tiny_model_dir, tmp_path, short_tmp):
    env = {
        "BLIP_MODEL": tiny_model_dir,
        "BLIP_MAX_NEW_TOKENS": "100",
        "BLIP_MIN_NEW_TOKENS": "100",  # one image a batch, 100 tokens: ~0.15 s an image or more
        "BLIP_MAX_BATCH_SIZE": "1",
        "BLIP_DRAIN_S": str(DRAIN_S),
        "TMPDIR": str(short_tmp),
    }
    images = [encode(scene(1300 + i), "PNG") for i in range(8)]
    server = bento_server(env, tmp_path / "bentoml.log").start()
    try:
        answers: list = []
        sender = threading.Thread(target=lambda: answers.extend(post_concurrently(f"{server.url}/caption", images)))
        sender.start()
        # SIGTERM once the model's queue holds some of the eight (the rest are in the model, or
        # done): however busy the machine, every one of them was accepted before the signal.
        wait_for_queue(server, 4)
        os.kill(server.process.pid, signal.SIGTERM)  # to the supervisor only, as a container runtime does
        sigterm = time.monotonic()

        # The supervisor passes the signal on to the workers: /readyz turns 503 once they have it,
        # and a load balancer polling it sees that within its next checks.
        readyz = httpx.get(f"{server.url}/readyz", timeout=5)
        while readyz.status_code == 200 and time.monotonic() - sigterm < 5:
            time.sleep(0.05)
            readyz = httpx.get(f"{server.url}/readyz", timeout=5)
        readyz_after = time.monotonic() - sigterm
        during_drain = httpx.post(f"{server.url}/caption", files={"file": images[0]}, timeout=60)
        sender.join(timeout=60)
        exit_code = server.process.wait(timeout=60)
        exited_after = time.monotonic() - sigterm
        log = server.log_text()
        left_in_tmp = sorted(path.name for path in short_tmp.iterdir())
    finally:
        server.stop()

    assert readyz.status_code == 503 and readyz_after < 5, (readyz.status_code, readyz_after)
    assert during_drain.status_code == 200 and during_drain.json()["caption"], during_drain.text
    assert [a.status for a in answers] == [200] * 8
    assert all(a.body["caption"] for a in answers)
    assert "SIGTERM: draining" in log and "drained: no new connections now" in log
    assert exit_code == 0 and DRAIN_S <= exited_after < DRAIN_S + 30, (exit_code, exited_after)
    assert [name for name in left_in_tmp if name.startswith("bentoml-")] == [], left_in_tmp
