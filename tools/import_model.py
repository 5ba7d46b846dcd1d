"""Copy a BLIP model directory into BentoML's model store as `blip-captioning`.

    python -m tools.import_model models/blip-base

With BLIP_MODEL unset, the service then serves this model, and `bentoml build` packs it into the
bento, so the container image starts with its weights and no network.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import bentoml

from blip_serve.shared.model_files import STORE_MODEL


def import_model(source: str | Path, name: str = STORE_MODEL) -> bentoml.Model:
    source = Path(source)
    if not (source / "config.json").is_file():
        raise SystemExit(f"{source} is not a model directory (no config.json)")
    with bentoml.models.create(name, labels={"source": source.name}) as model:
        shutil.copytree(source, model.path, dirs_exist_ok=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--name", default=STORE_MODEL)
    args = parser.parse_args()
    print(f"imported {import_model(args.model_dir, args.name).tag}")


if __name__ == "__main__":
    main()
