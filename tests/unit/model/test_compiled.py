"""BLIP_COMPILE's packages on a CPU (blip_serve/model/compiled.py): a package is named by what it
was compiled from, so other weights or settings never load a stale one, and a package that does not
load (cut short on a volume, say) is compiled again. The server's compiled captions and a restart
that loads the packages: tests/integration/test_compile.py."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

from blip_serve.model import compiled
from blip_serve.shared.settings import cxx_compiler
from support.tools import require


def test_the_weights_id_follows_the_files(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    before = compiled.weights_id(str(copy))
    assert before == compiled.weights_id(str(copy))
    weights = copy / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # saved again
    assert compiled.weights_id(str(copy)) != before


def test_a_package_name_changes_with_anything_it_was_compiled_from():
    name = compiled.package_name("vision", "weights A", dtype="torch.float32", largest=16)
    assert name.startswith("vision-") and name.endswith(".pt2")
    assert name == compiled.package_name("vision", "weights A", dtype="torch.float32", largest=16)
    others = [
        compiled.package_name("decoder", "weights A", dtype="torch.float32", largest=16),
        compiled.package_name("vision", "weights B", dtype="torch.float32", largest=16),
        compiled.package_name("vision", "weights A", dtype="torch.bfloat16", largest=16),
        compiled.package_name("vision", "weights A", dtype="torch.float32", largest=32),
    ]
    assert name not in others and len(set(others)) == len(others)


def small_layer():
    layer = torch.nn.Linear(8, 4).eval()
    example = torch.randn(3, 8)

    def export():
        rows = {0: torch.export.Dim("rows", min=1, max=16)}
        return torch.export.export(layer, (example,), dynamic_shapes=(rows,))

    return layer, example, export


@pytest.mark.slow  # an AOTInductor compile of a small layer (about 10 s on 2 cores)
def test_a_package_that_does_not_load_is_compiled_again_and_the_next_start_loads_it(tmp_path, caplog, monkeypatch):
    layer, example, export = small_layer()
    require(cxx_compiler() is not None, "a C++ compiler to compile the model (apt-get install g++)")
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    (tmp_path / "cache").mkdir()
    tmp_path = tmp_path / "cache"
    (tmp_path / "layer.pt2").write_bytes(b"PK\x03\x04" + bytes(1000))  # a package cut short
    killed = tmp_path / ".layer.pt2.killed.pt2"  # left by a process killed while compiling, hours ago
    killed.write_bytes(bytes(1000))
    os.utime(killed, (killed.stat().st_atime, killed.stat().st_mtime - 2 * compiled.STALE_PARTIAL_S))
    (tmp_path / ".layer.pt2.writing.pt2").write_bytes(b"")  # another worker's compile, under way
    runner, loaded = compiled.load_or_compile(str(tmp_path), "layer.pt2", export)
    assert not loaded and "does not load" in caplog.text
    with torch.inference_mode():
        assert torch.allclose(runner(example), layer(example), atol=1e-6)
    # No partial package of its own left, the old one removed, the one under way untouched.
    assert sorted(path.name for path in tmp_path.iterdir()) == [".layer.pt2.writing.pt2", "layer.pt2"]

    runner, loaded = compiled.load_or_compile(str(tmp_path), "layer.pt2", export)
    assert loaded  # the next start reads it
    with torch.inference_mode():
        assert torch.allclose(runner(example[:1]), layer(example[:1]), atol=1e-6)
    # Loading unpacks each package under $TMPDIR: nothing of it is left once loaded (a server
    # process ends without the runner's destructor, which alone removed it).
    assert list(temp.glob("aotinductor_*")) == list(temp.glob("blip-unpack-*")) == []
    assert os.environ["TMPDIR"] == str(temp)


@pytest.mark.slow  # an AOTInductor compile of a small layer
def test_a_folder_it_cannot_write_still_serves_compiled(tmp_path, caplog, monkeypatch):
    layer, example, export = small_layer()
    require(cxx_compiler() is not None, "a C++ compiler to compile the model (apt-get install g++)")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    (tmp_path / "a-file").write_text("")
    folder = tmp_path / "a-file" / "cache"  # BLIP_COMPILE_CACHE under a file: no folder can be made
    runner, loaded = compiled.load_or_compile(str(folder), "layer.pt2", export)
    assert not loaded and f"cannot write to {folder}" in caplog.text
    with torch.inference_mode():
        assert torch.allclose(runner(example), layer(example), atol=1e-6)
    assert list((tmp_path / "temp").iterdir()) == []  # the package it compiled to load is gone


@pytest.mark.slow  # four AOTInductor compiles of the tiny model (about a minute on 2 cores)
def test_hybrid_and_bf16_keep_their_own_vision_package_in_one_cache(tiny_model_dir, tmp_path):
    """Both run a bf16 vision tower, but hybrid's hands fp32 embeddings to its fp32 decoder. When
    the two shared a package name, bf16 after hybrid on the same volume loaded hybrid's, and every
    beam-search caption (transformers' generate) answered 500: bf16 weights fed fp32 embeddings."""
    import numpy as np

    from blip_serve.model.captioner import BlipCaptioner
    from blip_serve.shared.jobs import CaptionJob
    from blip_serve.shared.settings import load_settings

    require(cxx_compiler() is not None, "a C++ compiler to compile the model (apt-get install g++)")
    cache = tmp_path / "cache"
    results = {}
    for precision in ("hybrid", "bf16"):
        env = {"BLIP_PRECISION": precision, "BLIP_COMPILE": "on", "BLIP_COMPILE_CACHE": str(cache)}
        captioner = BlipCaptioner(tiny_model_dir, load_settings(env))
        assert captioner.compiled_parts == ["vision", "decoder"]
        pixels = np.random.default_rng(0).integers(0, 256, captioner.pixel_shape, dtype=np.uint8)
        greedy, beams = (
            CaptionJob(pixels=pixels, max_new_tokens=5),
            CaptionJob(pixels=pixels, max_new_tokens=5, num_beams=2),
        )
        results[precision] = captioner.caption_jobs([greedy, beams])
        assert [result.status for result in results[precision]] == [200, 200], results[precision]
    assert len(list(cache.glob("vision-*.pt2"))) == 2
