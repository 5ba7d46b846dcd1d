"""Where BLIP's files come from: a local directory, the Hugging Face hub, or BentoML's model store.

Imports only BentoML (no torch), so `import_model` and `bentoml build` stay light.
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import bentoml
from bentoml.models import HuggingFaceModel

from blip_serve.shared.settings import DEFAULT_MODEL

STORE_MODEL = "blip-captioning"  # the name `python -m tools.import_model` stores a model under
HUB_EXCLUDE = ["tf_model.h5", "*.msgpack", "*.onnx"]
RANDOM_WEIGHTS = "RANDOM_WEIGHTS"  # a file tiny_model writes: /info and the start-up line report it


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


class HubUnreachable(SystemExit):
    """The model was to come from the hub, and the hub did not give it: one line, no traceback."""


class NoSuchModelDirectory(SystemExit):
    """BLIP_MODEL names a local path that is not there, or holds no model: one line, no traceback."""


def looks_like_a_path(value: str) -> bool:
    """A BLIP_MODEL that cannot be a hub id, or that names a folder here on its way: a path."""
    if value.startswith((".", "/", "~")) or not HUB_ID.fullmatch(value):
        return True
    first = value.split("/")[0]
    return "/" in value and Path(first).exists()


@attrs.define(unsafe_hash=True)
class HubModel(HuggingFaceModel):
    """bentoml.models.HuggingFaceModel that says what to do when the download fails, instead of a
    40-line huggingface_hub traceback (BentoML resolves it when `bentoml serve` starts)."""

    def to_info(self, alias=None):
        """What `bentoml build` records of a hub model: its current revision, asked of the hub."""
        try:
            return super().to_info(alias)
        except Exception as exc:
            raise HubUnreachable(
                f"bentoml build could not ask the Hugging Face hub for {self.model_id} ({first_line(exc)}). "
                "To build a bento with a local BLIP in it, import it first: "
                "`python -m tools.import_model DIR`, then `bentoml build`."
            ) from None

    def resolve(self, base_path=None) -> str:
        try:
            return super().resolve(base_path)
        except Exception as exc:
            reason = first_line(exc)
            local = (
                ""
                if self.model_id == DEFAULT_MODEL
                else f" It is no local directory either ({Path(self.model_id).absolute()} does not exist)."
            )
            raise HubUnreachable(
                f"could not download {self.model_id} from the Hugging Face hub ({reason}).{local} "
                "Set BLIP_MODEL to a local BLIP directory, or import one into the model store with "
                "`python -m tools.import_model DIR`; to try the server without weights, "
                "`python -m tools.tiny_model models/tiny` and BLIP_MODEL=models/tiny."
            ) from None


def first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def model_source(setting: str):
    """Where BLIP's files come from, as a BentoML service class attribute:

    - BLIP_MODEL a local directory: that directory (a str);
    - BLIP_MODEL a hub id: a HubModel, downloaded when the server starts;
    - BLIP_MODEL unset: the model store's `blip-captioning` (a BentoModel, which `bentoml build`
      packs into the bento) when there is one, else the hub's Salesforce/blip-image-captioning-base.
    """
    if setting and Path(setting).expanduser().is_dir():
        directory = Path(setting).expanduser()
        if not holds_a_model(directory):
            raise NoSuchModelDirectory(
                f"BLIP_MODEL={setting!r}: {directory.absolute()} holds no saved model (save_pretrained writes "
                "config.json and model.safetensors or pytorch_model.bin): point it at the model's own folder"
            )
        return str(directory)
    if setting and looks_like_a_path(setting):
        where = Path(setting).expanduser().absolute()
        what = "is not a directory" if where.exists() else "does not exist"
        raise NoSuchModelDirectory(f"BLIP_MODEL={setting!r}: no such model directory ({where} {what})")
    if setting:
        return HubModel(setting, exclude=HUB_EXCLUDE)
    try:
        return bentoml.models.BentoModel(bentoml.models.get(STORE_MODEL).tag)
    except bentoml.exceptions.NotFound:
        return HubModel(DEFAULT_MODEL, exclude=HUB_EXCLUDE)


def holds_a_model(directory: Path) -> bool:
    """A folder as save_pretrained (or a hub snapshot) leaves it: a config and weights."""
    weights = ("*.safetensors", "pytorch_model*.bin")
    return (directory / "config.json").is_file() and any(any(directory.glob(p)) for p in weights)


def model_dir(resolved) -> str:
    """The directory behind a resolved model attribute: a path string, or a stored BentoML model."""
    return str(getattr(resolved, "path", resolved))


def describe_source(resolved) -> str:
    """The served model in words: a directory, a hub id, or the model store's tag."""
    if isinstance(resolved, str):
        return resolved
    if isinstance(resolved, HubModel):
        return f"{resolved.model_id} (Hugging Face hub)"
    return f"{getattr(resolved, 'tag', resolved)} (BentoML model store)"


def served_model_id(resolved) -> str:
    """The model's id on the OpenAI-compatible routes: the hub id, the directory's name, or the
    stored model's name."""
    if isinstance(resolved, str):
        return Path(resolved).name or resolved
    if isinstance(resolved, HubModel):
        return resolved.model_id
    return str(getattr(getattr(resolved, "tag", None), "name", STORE_MODEL))
