"""k8s/ rendered by kubectl's built-in kustomize, as Python objects."""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess

import yaml

from tools.servers import REPO

from .tools import require


def render(overlay: str) -> list[dict]:
    """The overlay's objects (a fresh copy: tests may edit them)."""
    return copy.deepcopy(rendered_once(overlay))


@functools.cache
def rendered_once(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    require(kubectl is not None, "kubectl on the PATH (it renders k8s/ with its built-in kustomize)")
    text = subprocess.run(
        [kubectl, "kustomize", str(REPO / "k8s" / "overlays" / overlay)], capture_output=True, text=True, check=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def one(objects: list[dict], kind: str, name_prefix: str = "blip-serve") -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, f"{kind}: {[o['metadata']['name'] for o in found]}"
    return found[0]
