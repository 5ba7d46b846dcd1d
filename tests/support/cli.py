"""The blip-caption command line as the tests run it: a folder of images, the run, what it wrote."""

from __future__ import annotations

import contextlib
import io
import json
import resource
import subprocess
import sys
import traceback
from pathlib import Path

from blip_serve.client.cli import main
from support.images import encode, scene
from tools.servers import REPO


def make_folder(root: Path, count: int = 40, bad: int = 4) -> list[Path]:
    """`count` image files in nested folders, `bad` of them not images, plus two files to skip."""
    images = []
    for i in range(count):
        folder = root / f"set{i % 3}" / ("deep" if i % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:02d}.png"
        path.write_bytes(b"not an image at all" if i < bad else encode(scene(900 + i), "PNG"))
        images.append(path)
    (root / "notes.md").write_text("skip me")
    (root / "set1" / "data.csv").write_text("skip,me")
    return images


def blip_caption(url: str, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "blip_serve.client", *args, "--url", url, "--quiet"]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def records(out: Path) -> list[dict]:
    text = out.read_text()
    assert text.endswith("\n"), "a torn last line"
    return [json.loads(line) for line in text.splitlines()]


def run_cli(url: str, *args: str, memory_limit: int | None = None) -> subprocess.CompletedProcess:
    """blip-caption in a process of its own; with `memory_limit`, its address space is capped (a
    client that read a 1 GiB answer into memory would fail with a MemoryError)."""
    command = [sys.executable, "-m", "blip_serve.client", *args, "--url", url]
    limit = (lambda: resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))) if memory_limit else None
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=limit)


def run_cli_here(url: str, *args: str) -> subprocess.CompletedProcess:
    """blip-caption's main() in this process, for the tests where a process of its own is not the
    point (its exit status and words are): what run_cli returns, a few hundred ms sooner."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([*args, "--url", url])
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
        except Exception:
            traceback.print_exc()  # as a process would show it: the tests look for "Traceback"
            code = 1
    return subprocess.CompletedProcess(["blip-caption", *args], code, out.getvalue(), err.getvalue())


GIB = 1 << 30
