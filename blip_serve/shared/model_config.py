"""What a BLIP model directory's files say, read without torch or transformers: the API worker checks
requests against them and the model worker follows the same rules."""

from __future__ import annotations

import json
from pathlib import Path


def decoder_positions(model_dir: str | Path) -> int:
    """How many positions BLIP's text decoder has (512 for the real model)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("text_config", {}).get("max_position_embeddings", 512))


def decoder_prompt(token_ids: list[int], start_id: int) -> list[int]:
    """BLIP's rule for a prompt, as BlipForConditionalGeneration.generate applies it: the decoder
    starts from the tokenizer's ids with [CLS] turned into [DEC] (`start_id`) and the final [SEP]
    dropped; without a prompt, from [DEC] alone."""
    return [start_id, *token_ids[1:-1]] if token_ids else [start_id]


def image_processor_config(model_dir: str | Path) -> dict:
    """The image processor's settings: preprocessor_config.json (the hub's files), or the
    "image_processor" part of processor_config.json (what transformers 5 saves)."""
    model_dir = Path(model_dir)
    if (model_dir / "preprocessor_config.json").is_file():
        return json.loads((model_dir / "preprocessor_config.json").read_text())
    return json.loads((model_dir / "processor_config.json").read_text())["image_processor"]
