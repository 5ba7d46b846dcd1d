"""The text side of a request, checked in the API process before it queues: the prompt's tokens plus
`max_new_tokens` must fit in the text decoder's position embeddings, or generate fails mid-batch.

Counts tokens with the model's own tokenizer.json through `tokenizers` (no torch, no transformers).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from .errors import BadRequest

logger = logging.getLogger("bentoml.blip_serve")


def decoder_positions(model_dir: str | Path) -> int:
    """How many positions BLIP's text decoder has (512 for the real model)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("text_config", {}).get("max_position_embeddings", 512))


@dataclass
class TextLimits:
    tokenizer: Tokenizer
    positions: int
    max_new_tokens_limit: int  # the setting, clamped to what the positions allow

    @classmethod
    def for_model(cls, model_dir: str | Path, max_new_tokens_limit: int) -> TextLimits:
        positions = decoder_positions(model_dir)
        tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        allowed = positions - 1  # generate starts from one [DEC] token
        if max_new_tokens_limit > allowed:
            logger.warning(
                "BLIP_MAX_NEW_TOKENS_LIMIT=%d is more than the model's %d text positions allow; using %d",
                max_new_tokens_limit,
                positions,
                allowed,
            )
        return cls(tokenizer, positions, min(max_new_tokens_limit, allowed))

    def start_length(self, prompt: str | None) -> int:
        """Tokens the decoder starts from: [DEC] alone, or [DEC] + the prompt's tokens (BLIP's
        generate turns the tokenizer's [CLS] into [DEC] and drops its final [SEP])."""
        if not prompt:
            return 1
        return len(self.tokenizer.encode(prompt).ids) - 1

    def check(self, prompt: str | None, max_new_tokens: int) -> None:
        """BadRequest, with the numbers, unless the caption fits in the decoder's positions."""
        if max_new_tokens > self.max_new_tokens_limit:
            raise BadRequest(
                f"'max_new_tokens' is {max_new_tokens}; the most this server allows is {self.max_new_tokens_limit}"
            )
        start = self.start_length(prompt)
        if start + max_new_tokens > self.positions:
            raise BadRequest(
                f"the prompt is {start - 1} tokens and max_new_tokens is {max_new_tokens}: together they "
                f"need {start + max_new_tokens} positions and the model has {self.positions}; "
                "shorten the prompt or lower max_new_tokens"
            )
