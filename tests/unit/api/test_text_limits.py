"""blip_serve/api/text_limits.py: the token bound, clamped to the model, enforced and published as one
value; the prompt and the caption must fit the decoder's positions."""

from __future__ import annotations

import pytest
from fastapi import FastAPI

from blip_serve.api.text_limits import TextLimits
from blip_serve.api.uploads import UploadReader
from blip_serve.shared.errors import BadRequest
from blip_serve.shared.settings import Settings


@pytest.fixture(scope="module")
def text_limits(tiny_model_dir) -> TextLimits:
    return TextLimits.for_model(tiny_model_dir, max_new_tokens_limit=1000)


def test_the_token_limit_is_clamped_to_the_models_positions(text_limits):
    assert text_limits.positions == 128
    assert text_limits.max_new_tokens_limit == 127


def test_prompt_tokens_plus_new_tokens_must_fit(text_limits):
    start = text_limits.start_length("dog " * 20)
    assert start == 21  # [DEC] + 20 words: the tokenizer's [CLS] becomes [DEC], its [SEP] is dropped
    text_limits.check("dog " * 20, 128 - start)
    with pytest.raises(BadRequest, match="the prompt is 20 tokens and max_new_tokens is 108: together they need 129"):
        text_limits.check("dog " * 20, 129 - start)
    # max_new_tokens alone: bounded where the options are read, by the clamped limit.
    with pytest.raises(BadRequest, match="'max_new_tokens': Input should be less than or equal to 127"):
        UploadReader(Settings(), text_limits.max_new_tokens_limit).caption_options({"max_new_tokens": 128})


def test_the_published_token_limit_is_the_enforced_one(text_limits):
    from blip_serve.api.docs import openapi_document
    from blip_serve.api.openai_api import chat_completions_body
    from blip_serve.api.uploads import caption_bodies

    app = FastAPI()

    @app.post("/caption", openapi_extra=caption_bodies(Settings()))
    async def caption() -> None: ...

    @app.post("/v1/chat/completions", openapi_extra=chat_completions_body())
    async def chat() -> None: ...

    maxima = []

    def collect(node):
        if isinstance(node, dict):
            for name, field in (node.get("properties") or {}).items():
                if name in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
                    maxima.append(field.get("maximum"))
            if node.get("in") == "query" and node.get("name") == "max_new_tokens":
                maxima.append(node["schema"].get("maximum"))
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(openapi_document(app, text_limits.max_new_tokens_limit))
    assert len(maxima) >= 5 and set(maxima) == {127}  # the setting was 1000; the model allows 127
