"""The text side of a request, checked in the API process before it queues: the prompt's tokens plus
`max_new_tokens` must fit in the text decoder's position embeddings, or generate fails mid-batch.

Counts tokens with the model's own tokenizer.json through `tokenizers` (no torch, no transformers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from blip_serve.shared.errors import BadRequest
from blip_serve.shared.model_config import decoder_positions, decoder_prompt

logger = logging.getLogger("bentoml.blip_serve")


@dataclass
class TextLimits:
    tokenizer: Tokenizer
    positions: int
    max_new_tokens_limit: int  # the setting, clamped to what the positions allow: the one value served

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
        """Tokens the decoder starts from (decoder_prompt)."""
        return len(decoder_prompt(self.tokenizer.encode(prompt).ids if prompt else [], 0))

    def check(self, prompt: str | None, max_new_tokens: int) -> None:
        """BadRequest, with the numbers, unless the prompt and the caption fit in the decoder's
        positions (max_new_tokens alone is bounded by max_new_tokens_limit where the options are
        read: uploads.options_model)."""
        start = self.start_length(prompt)
        if start + max_new_tokens > self.positions:
            raise BadRequest(
                f"the prompt is {start - 1} tokens and max_new_tokens is {max_new_tokens}: together they "
                f"need {start + max_new_tokens} positions and the model has {self.positions}; "
                "shorten the prompt or lower max_new_tokens"
            )
