"""Two model workers on a CPU: the API worker has a channel to each, both caption, and the captions
stay exact."""

from __future__ import annotations

import psutil
import pytest

from support.clients import post_concurrently
from support.images import encode, scene
from tools.servers import bento_server

pytestmark = pytest.mark.slow  # starts the real server


def test_two_model_workers_both_caption_exactly(tiny_model_dir, reference, tmp_path):
    env = {"BLIP_MODEL": tiny_model_dir, "BLIP_PRECISION": "fp32", "BLIP_MODEL_WORKERS": "2"}
    images = [encode(scene(1000 + i), "PNG") for i in range(48)]
    with bento_server(env, tmp_path / "bentoml.log") as server:
        tree = psutil.Process(server.process.pid).children(recursive=True)
        workers = [p for p in tree if "BlipModelService" in " ".join(p.cmdline())]
        assert len(workers) == 2
        before = [sum(w.cpu_times()[:2]) for w in workers]
        answers, rounds = [], 0
        # Several rounds; more while a worker has no channel yet: /readyz turns 200 once one model
        # worker answers, and the API worker passes over the other until it serves its socket.
        while rounds < 3 or (rounds < 10 and server.log_text().count("a channel from an API worker opened") < 2):
            answers += post_concurrently(f"{server.url}/caption", images)
            rounds += 1
        used = [sum(w.cpu_times()[:2]) - start for w, start in zip(workers, before)]
        log = server.log_text()
    assert [a.status for a in answers] == [200] * len(answers)
    assert [a.body["caption"] for a in answers] == [reference.caption(d) for d in images] * rounds
    assert "model worker 1" in log and "model worker 2" in log
    # The one API worker opened a channel to each model worker (api/model_channel.py).
    assert "model worker 1: a channel from an API worker opened" in log
    assert "model worker 2: a channel from an API worker opened" in log
    print(f"model workers' CPU seconds during the load: {used}")
    # The kernel spreads the API's connections over the two workers' accept(); each did real work
    # (an idle worker spends a few hundredths of a second in that time).
    assert min(used) > 0.15, used
