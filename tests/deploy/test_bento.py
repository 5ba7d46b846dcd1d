"""The model store and `bentoml build`: a bento carries its model and serves it with BLIP_MODEL unset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from support.images import encode, scene
from support.locks import read_lock
from tools.servers import BENTOML, REPO, ServerProcess, free_port

pytestmark = pytest.mark.slow  # starts the real server


@pytest.fixture(scope="module")
def bentoml_home(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    """A BentoML home of its own with the tiny model imported as blip-captioning."""
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("BLIP_MODEL", None)
    result = subprocess.run(
        [sys.executable, "-m", "tools.import_model", tiny_model_dir],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "imported blip-captioning:" in result.stdout
    return env


def source_kind(env: dict[str, str], setting: str) -> str:
    code = f"from blip_serve.shared.model_files import model_source; print(type(model_source({setting!r})).__name__)"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_model_source_prefers_the_stored_model(bentoml_home, tiny_model_dir, tmp_path):
    assert source_kind(bentoml_home, "") == "BentoModel"
    assert source_kind(bentoml_home, tiny_model_dir) == "str"
    assert source_kind(bentoml_home, "Salesforce/blip-image-captioning-base") == "HubModel"
    empty_home = {**bentoml_home, "BENTOML_HOME": str(tmp_path)}
    assert source_kind(empty_home, "") == "HubModel"  # the hub default


def test_bentoml_build_without_a_model_and_no_hub_says_to_import_one(tmp_path):
    """Before: a 114-line traceback from huggingface_hub."""
    closed = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "HF_ENDPOINT": closed, "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("BLIP_MODEL", None)
    build = subprocess.run([BENTOML, "build"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in (build.stdout + build.stderr).strip().splitlines() if "torchvision" not in line]
    assert build.returncode != 0 and len(lines) == 1, lines
    assert lines[0].startswith(
        "bentoml build could not ask the Hugging Face hub for Salesforce/blip-image-captioning-base"
    )
    assert lines[0].endswith("import it first: `python -m tools.import_model DIR`, then `bentoml build`.")


def test_the_gpu_bentofile_differs_only_in_its_lock():
    cpu = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    gpu = yaml.safe_load((REPO / "bentofile.gpu.yaml").read_text())
    assert cpu["python"].pop("requirements_txt") == "requirements.txt"
    assert gpu["python"].pop("requirements_txt") == "requirements-gpu.txt"
    assert cpu == gpu


def test_bentoml_build_packs_the_model_and_the_bento_serves_it(bentoml_home, reference, tmp_path):
    build = subprocess.run(
        [BENTOML, "build", "--output", "tag"], cwd=REPO, env=bentoml_home, capture_output=True, text=True
    )
    assert build.returncode == 0, build.stdout + build.stderr
    tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("blip-serve:")
    bento_dir = Path(bentoml_home["BENTOML_HOME"]) / "bentos" / "blip-serve" / tag.split(":")[1]
    manifest = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    for service in manifest["services"]:  # `bentoml containerize` copies these models into the image
        assert [m["tag"].split(":")[0] for m in service["models"]] == ["blip-captioning"]
    assert sorted(p.name for p in (bento_dir / "src").iterdir()) == ["bentofile.yaml", "blip_serve", "service.py"]
    # What `bentoml containerize` installs: the lock, every pin and hash as in requirements.txt
    # (BentoML rewrites the file's layout, not its requirements).
    assert read_lock(bento_dir / "env" / "python" / "requirements.txt") == read_lock("requirements.txt")
    source = bento_dir / "src" / "blip_serve"
    packed = sorted(str(p.relative_to(source)) for p in source.rglob("*.py"))
    assert not [name for name in packed if name.startswith("client/")]  # only what serves
    assert {"api/http.py", "decoding/child.py", "model/captioner.py", "shared/settings.py", "host/patches.py"} <= set(
        packed
    )

    # Serve the built bento, not the source tree: what the container image runs.
    port = free_port()
    env = {**bentoml_home, "HF_HUB_OFFLINE": "1"}
    server = ServerProcess(
        [BENTOML, "serve", tag, "--host", "127.0.0.1", "--port", str(port)], port, env, tmp_path / "bento.log"
    )
    image = encode(scene(42), "PNG")
    with server:
        response = httpx.post(f"{server.url}/caption", files={"file": ("p.png", image)}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json() == {"caption": reference.caption(image)}
