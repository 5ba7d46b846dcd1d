"""The demo notebook, executed top to bottom against the real server (tiny model)."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from tools.sample_images import write_samples
from tools.servers import REPO

pytestmark = pytest.mark.slow  # starts the real server

NOTEBOOK = REPO / "notebooks" / "parallel_captions.ipynb"


def test_notebook_prints_the_servers_caption_for_every_image(server, reference, tmp_path, monkeypatch):
    images = write_samples(tmp_path / "images", count=6)
    monkeypatch.setenv("BLIP_SERVER_URL", server.url)
    monkeypatch.setenv("BLIP_IMAGE_DIR", str(images))

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "commit it without outputs"
    )
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()

    printed = "".join(
        output.get("text", "")
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("name") == "stdout"
    )
    for path in sorted(images.iterdir()):
        assert f"\n{path.name}: {reference.caption(path.read_bytes())}\n" in "\n" + printed  # aiohttp cell
        assert f"client {path.name}: {reference.caption(path.read_bytes())}\n" in printed  # client library
    assert printed.count("concurrency ") == 8
    assert any("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


def test_the_notebook_picks_the_files_the_server_accepts():
    """The notebook stays a plain client (no import of blip_serve to pick files): its list of
    suffixes is checked against the one home of the accepted formats."""
    import ast

    from blip_serve.formats import IMAGE_SUFFIXES

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    [line] = [
        line for cell in notebook.cells for line in cell.source.splitlines() if line.startswith("IMAGE_SUFFIXES = ")
    ]
    assert ast.literal_eval(line.split("=", 1)[1].strip()) == IMAGE_SUFFIXES
