"""BLIP_COMPILE on a CPU: the vision tower and the engine's decoder step compiled ahead of time
(AOTInductor packages), through the real server (tiny model, fp32): generate's captions, and a
restart loads the packages from BLIP_COMPILE_CACHE instead of compiling. The engine's maths
uncompiled: tests/unit/model/test_engine.py."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from blip_serve.shared.settings import cxx_compiler, load_settings
from support.clients import post_caption, post_concurrently
from support.images import encode, scene
from support.tools import require
from tools.servers import bento_server


@pytest.fixture(scope="module")
def captioner(tiny_model_dir):
    from blip_serve.model.captioner import BlipCaptioner

    return BlipCaptioner(tiny_model_dir, load_settings({"BLIP_PRECISION": "fp32"}))


def compiling(tiny_model_dir, tmp_path) -> tuple:
    """A compile cache, and a server's settings that compile the tiny model into it (fp32)."""
    require(cxx_compiler() is not None, "a C++ compiler to compile the model (apt-get install g++)")
    cache = tmp_path / "compile-cache"
    env = {
        "BLIP_MODEL": tiny_model_dir,
        "BLIP_PRECISION": "fp32",
        "BLIP_COMPILE": "on",
        "BLIP_COMPILE_CACHE": str(cache),
    }
    return cache, env


def test_a_generation_config_with_other_rules_keeps_generate(captioner):
    from blip_serve.model.engine import unsupported_settings

    config = captioner.model.text_decoder.generation_config
    assert unsupported_settings(captioner.model) == []
    config.repetition_penalty = 1.3
    try:
        assert unsupported_settings(captioner.model) == ["repetition_penalty"]
    finally:
        config.repetition_penalty = 1.0


@pytest.mark.slow  # starts the real server twice and compiles (about 80 s, then 10 s, on 2 cores)
def test_compiled_server_captions_equal_the_reference_and_a_restart_loads_the_packages(
    tiny_model_dir, reference, tmp_path
):
    cache, env = compiling(tiny_model_dir, tmp_path)
    images = [encode(scene(1100 + i), "PNG") for i in range(24)]
    with bento_server(env, tmp_path / "first.log") as server:
        answers = post_concurrently(f"{server.url}/caption", images)
        prompted = post_caption(
            server, files={"file": images[0]}, data={"prompt": "a picture of", "max_new_tokens": "12"}
        )
        beams = post_caption(server, files={"file": images[1]}, data={"num_beams": "2"})  # generate's own path
        info = httpx.get(f"{server.url}/info").json()
        first_log = server.log_text()
    assert "BLIP_COMPILE: ready in" in first_log and "(vision compiled, decoder compiled;" in first_log
    assert info["compiled_parts"] == ["vision", "decoder"]
    assert [a.status for a in answers] == [200] * len(images)
    assert [a.body["caption"] for a in answers] == [reference.caption(d) for d in images]
    assert prompted.json() == {"caption": reference.caption(images[0], prompt="a picture of", max_new_tokens=12)}
    assert beams.json() == {"caption": reference.caption(images[1], num_beams=2)}
    packages = sorted(path.name for path in cache.glob("*.pt2"))  # where BLIP_COMPILE_CACHE says
    assert [name.split("-")[0] for name in packages] == ["decoder", "vision"]

    with bento_server(env, tmp_path / "second.log") as server:
        again = post_concurrently(f"{server.url}/caption", images[:8])
        second_log = server.log_text()
    assert "(vision loaded, decoder loaded;" in second_log
    assert sorted(path.name for path in cache.glob("*.pt2")) == packages
    assert [a.body["caption"] for a in again] == [reference.caption(d) for d in images[:8]]


@pytest.mark.slow  # starts the real server and stops it a few seconds into compiling
def test_ctrl_c_while_compiling_stops_the_server_at_once_and_leaves_no_half_package(tiny_model_dir, tmp_path):
    """Compiling cannot be interrupted, and the server went on compiling (76 s for the full-size
    model) after a Ctrl-C before it stopped; now it stops at once, without the package it was writing."""
    cache, env = compiling(tiny_model_dir, tmp_path)
    server = bento_server(env, tmp_path / "serve.log")
    try:
        server.start(ready=None)  # the API answers /readyz 503 while the model compiles
        deadline = time.monotonic() + 120
        while not list(cache.glob(".vision-*.pt2")):  # a package being written
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            time.sleep(0.2)
        os.killpg(server.process.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole process group
        started = time.monotonic()
        server.process.wait(timeout=30)
        took = time.monotonic() - started
        log = server.log_text()
    finally:
        server.stop()
    assert took < 10, f"stopped after {took:.0f} s"
    assert "BLIP_COMPILE: stopped (signal" in log and "while compiling; exiting now" in log
    assert "BLIP_COMPILE: ready in" not in log  # it did not finish compiling first
    assert list(cache.glob("*.pt2")) == list(cache.glob(".*.pt2")) == []


@pytest.mark.slow  # starts the real server (tiny model) and tries to compile
@pytest.mark.parametrize(
    "settings, logged",
    [
        # A compiler that fails (a broken toolchain; a full disk fails likewise): captions all the same.
        ({"BLIP_COMPILE": "on", "BLIP_PRECISION": "fp32", "CXX": "/bin/false"}, "BLIP_COMPILE: compiling failed ("),
        # auto compiles bf16, but a slim container has no compiler: a warning, not a failed start.
        (
            {"BLIP_COMPILE": "auto", "BLIP_PRECISION": "bf16", "CXX": "/nonexistent/g++"},
            "but no C++ compiler was found",
        ),
    ],
    ids=["compiler-fails", "no-compiler"],
)
def test_a_model_that_cannot_be_compiled_is_served_uncompiled(tiny_model_dir, reference, tmp_path, settings, logged):
    env = {"BLIP_MODEL": tiny_model_dir, "BLIP_COMPILE_CACHE": str(tmp_path / "cache"), **settings}
    image = encode(scene(1200), "PNG")
    with bento_server(env, tmp_path / "serve.log") as server:
        answer = post_caption(server, files={"file": image})
        info = httpx.get(f"{server.url}/info").json()
        log = server.log_text()
    assert logged in log and "Traceback" not in log
    assert info["compiled_parts"] == [] and info["compiled"] is False
    assert answer.status_code == 200
    if settings.get("BLIP_PRECISION") == "fp32":
        assert answer.json() == {"caption": reference.caption(image)}
