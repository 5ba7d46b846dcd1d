"""blip_serve/client/ against the real server (tiny model): the library's captions equal the
reference, and blip-caption captions a folder, resumes, survives a restart and never overwrites."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blip_serve.client.library import BlipClient
from support.cli import blip_caption, make_folder, records, run_cli
from support.images import encode, scene
from tools.servers import REPO, bento_server, free_port

slow = pytest.mark.slow  # these start the real server


@slow
def test_library_captions_equal_the_reference(server, reference, tmp_path):
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(encode(scene(800 + i), "PNG"))
    client = BlipClient(server.url)
    assert client.caption(paths[0]) == reference.caption(paths[0].read_bytes())
    outcomes = client.caption_many(paths, concurrency=2, batch=2)
    assert [o.image for o in outcomes] == [str(p) for p in paths]
    assert [o.caption for o in outcomes] == [reference.caption(p.read_bytes()) for p in paths]


@slow
def test_cli_captions_a_folder_to_jsonl_and_sidecars(server, reference, tmp_path):
    images = make_folder(tmp_path / "photos")
    out = tmp_path / "captions.jsonl"
    run = blip_caption(server.url, str(tmp_path / "photos"), "--out", str(out), "--sidecar", "--batch", "8")
    _, summary = run.communicate(timeout=300)
    assert run.returncode == 1, summary  # four images failed
    assert "36 captioned, 4 failed (415); 0 already done, 2 skipped (not images)" in summary

    lines = records(out)
    assert sorted(r["path"] for r in lines) == sorted(str(p) for p in images)
    for record in lines:
        path = Path(record["path"])
        if record.get("caption") is None:
            assert record["status"] == 415 and not path.with_suffix(".txt").exists()
        else:
            assert record["caption"] == reference.caption(path.read_bytes())
            assert path.with_suffix(".txt").read_text() == record["caption"] + "\n"


@slow
def test_cli_writes_csv_and_resumes_only_what_failed(server, reference, tmp_path):
    import csv

    images = make_folder(tmp_path / "photos", count=10, bad=2)
    out = tmp_path / "captions.csv"
    first = blip_caption(server.url, str(tmp_path / "photos"), "--out", str(out))
    first.communicate(timeout=120)
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "blip_serve.client",
            str(tmp_path / "photos"),
            "--url",
            server.url,
            "--out",
            str(out),
            "--resume",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "skipped (not an image): " in again.stderr and "notes.md" in again.stderr
    assert "nothing to do; 10 already done, 2 skipped (not images)" in again.stderr  # a 415 stays a 415
    assert again.returncode == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 10  # one row per image: the refused ones are not appended again
    captioned = {row["path"]: row["caption"] for row in rows if row["caption"]}
    assert sorted(captioned) == sorted(str(p) for p in images[2:])
    assert all(caption == reference.caption(Path(path).read_bytes()) for path, caption in captioned.items())


@pytest.fixture
def slow_server(tiny_model_dir, tmp_path):
    env = {"BLIP_MODEL": tiny_model_dir, "BLIP_MAX_NEW_TOKENS": "100", "BLIP_MIN_NEW_TOKENS": "100"}
    with bento_server(env, tmp_path / "slow.log") as running:
        yield running


@slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_an_interrupted_run_resumes_without_duplicates(slow_server, tmp_path, stop):
    images = make_folder(tmp_path / "photos", bad=0)
    out = tmp_path / "captions.jsonl"
    args = [str(tmp_path / "photos"), "--out", str(out), "--batch", "2", "--concurrency", "1"]
    run = blip_caption(slow_server.url, *args)
    deadline = time.monotonic() + 120
    while (not out.exists() or len(out.read_text().splitlines()) < 6) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(run.pid, stop)
    _, said = run.communicate(timeout=60)
    first = out.read_text()
    if stop == signal.SIGINT:  # Ctrl-C: one line that says how to go on, no traceback
        assert run.returncode == 130 and "Traceback" not in said, said
        [line] = [line for line in said.splitlines() if line.strip()]
        assert line.startswith("interrupted after ") and line.endswith(" --resume"), line
    assert 6 <= first.count("\n") < 40, "the run was stopped midway"

    resumed = blip_caption(slow_server.url, *args, "--resume")
    _, summary = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, summary
    paths = [r["path"] for r in records(out)]
    assert sorted(paths) == sorted(str(p) for p in images) and len(paths) == len(set(paths)) == 40


@slow
def test_a_run_survives_a_server_restart(tiny_model_dir, tmp_path):
    images = make_folder(tmp_path / "photos", bad=0)
    out = tmp_path / "captions.jsonl"
    port = free_port()
    env = {"BLIP_MODEL": tiny_model_dir, "BLIP_MAX_NEW_TOKENS": "100", "BLIP_MIN_NEW_TOKENS": "100"}
    first = bento_server(env, tmp_path / "first.log", port=port).start()
    args = [str(tmp_path / "photos"), "--out", str(out), "--batch", "2", "--concurrency", "1"]
    run = blip_caption(first.url, *args)
    deadline = time.monotonic() + 120
    try:
        while (not out.exists() or len(out.read_text().splitlines()) < 4) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        first.stop()  # the client retries 502/503/connection errors with backoff meanwhile
    with bento_server(env, tmp_path / "second.log", port=port):
        _, summary = run.communicate(timeout=300)
    assert run.returncode == 0, summary
    assert sorted(r["path"] for r in records(out)) == sorted(str(p) for p in images)


@slow
def test_sidecars_never_overwrite_and_clashes_stop_before_any_request(server, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    image = encode(scene(7), "PNG")
    for name in ("dup.jpg", "dup.png", "keep.jpg", "new.jpg"):
        (folder / name).write_bytes(image)
    (folder / "keep.txt").write_text("written by hand\n")
    clash = run_cli(server.url, str(folder), "--sidecar")
    assert clash.returncode == 2 and "would be written twice" in clash.stderr
    assert sorted(p.name for p in folder.glob("*.txt")) == ["keep.txt"]
    (folder / "dup.png").unlink()
    refused = run_cli(server.url, str(folder), "--sidecar")
    assert refused.returncode == 2 and "exist already" in refused.stderr
    resumed = run_cli(server.url, str(folder), "--sidecar", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (folder / "keep.txt").read_text() == "written by hand\n"
    assert (folder / "new.txt").read_text() and (folder / "dup.txt").read_text()
