"""OpenAI's chat-completions API, for captions: what the `openai` SDK, LiteLLM, LangChain and Open
WebUI send to a model that sees, read into the same image and options as POST /caption.

    read_chat_request(body, ...)  -> ChatCall: the image (bytes, or a URL to fetch), prompt, options
    completion(...)               -> a `chat.completion` object
    completion_chunks(...)        -> the same as Server-Sent Events, ending with `data: [DONE]`
    model_list(model_id)          -> GET /v1/models

The last `user` message carries exactly one image (an `image_url` part) and, optionally, `text`
parts: they become the prompt, which BLIP continues (it does not follow instructions). Earlier
messages and `system` messages are accepted and not used. Parameters that would change the answer
and that BLIP cannot honour (sampling, `n` > 1, log-probabilities, tools, penalties, stop
sequences) are refused with a 400 that names them, never ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blip_serve.api.uploads import CaptionOptions, UploadReader, decode_base64_image
from blip_serve.shared.errors import BadRequest, NotFound

if TYPE_CHECKING:
    from blip_serve.shared.jobs import CaptionResult  # a caption and its token count (jobs.py imports BentoML)

INLINE = "send the image inline as a data: URL (data:image/jpeg;base64,...)"


@dataclass(frozen=True)
class ChatCall:
    image: bytes | None  # the image's bytes, or None when `url` must be fetched
    url: str | None
    prompt: str | None
    max_new_tokens: int | None
    stream: bool
    include_usage: bool


# The caption options a chat request carries, by the names its client knows them by.
CHAT_LABELS = {"prompt": "the text", "max_new_tokens": "'max_tokens'"}
CHAT_PARAMS = {"prompt": "messages", "max_new_tokens": "max_tokens"}


def chat_options(reader: UploadReader, call: ChatCall) -> CaptionOptions:
    """The options of a chat completion, checked as /caption's are (one options model); a refusal
    names the chat parameter (max_tokens, or messages for the prompt)."""
    values = {"prompt": call.prompt, "max_new_tokens": call.max_new_tokens}
    return reader.caption_options(values, labels=CHAT_LABELS, params=CHAT_PARAMS)


def refuse(message: str, param: str) -> BadRequest:
    return BadRequest(message, param=param)


def read_chat_request(body: object, model_id: str, fetch_allowed: bool) -> ChatCall:
    """The caption request in an OpenAI chat-completions body, or a BadRequest/NotFound naming
    the parameter at fault."""
    if not isinstance(body, dict):
        raise refuse("the body must be a JSON object with 'model' and 'messages'", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise refuse(f"'model' is required: this server serves '{model_id}' (GET /v1/models)", "model")
    if model != model_id:
        raise NotFound(f"The model '{model}' does not exist; this server serves '{model_id}'", param="model")
    refuse_what_blip_cannot_honour(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise refuse("'messages' must be a non-empty list of message objects", "messages")
    *earlier, last = messages
    if last.get("role") != "user":
        raise refuse("the last message must be the user's, with the image to caption", "messages")
    if any(image_parts(message) for message in earlier):
        raise refuse(
            "only the last user message may carry an image: send one image per request (POST /captions takes many)",
            "messages",
        )
    images, texts = image_parts(last), text_parts(last)
    if len(images) != 1:
        raise refuse(
            f"the last user message must carry exactly one image_url part, not {len(images)} "
            "(POST /captions takes many images)",
            "messages",
        )
    url = image_url(images[0])
    prompt = " ".join(texts).strip() or None
    call = dict(prompt=prompt, max_new_tokens=max_tokens(body), stream=body.get("stream") is True)
    call["include_usage"] = isinstance(body.get("stream_options"), dict) and bool(
        body["stream_options"].get("include_usage")
    )
    if url.startswith("data:"):
        return ChatCall(image=decode_base64_image(url), url=None, **call)
    if url.lower().startswith(("http://", "https://")):
        if not fetch_allowed:
            raise refuse(f"this server does not fetch image URLs: {INLINE}", "messages")
        return ChatCall(image=None, url=url, **call)
    raise refuse(f"an image_url must be a data: URL or an http(s) URL: {INLINE}", "messages")


def refuse_what_blip_cannot_honour(body: dict) -> None:
    checks = [
        ("n", lambda v: v not in (None, 1), "'n' must be 1: one caption per request"),
        (
            "temperature",
            lambda v: v not in (None, 0),
            "sampling is not supported: BLIP captions greedily; send temperature 0 or none",
        ),
        ("logprobs", lambda v: v not in (None, False), "'logprobs' is not supported"),
        ("top_logprobs", lambda v: v is not None, "'top_logprobs' is not supported"),
        ("tools", lambda v: bool(v), "tools are not supported: BLIP only captions"),
        ("functions", lambda v: bool(v), "functions are not supported: BLIP only captions"),
        ("frequency_penalty", lambda v: v not in (None, 0), "'frequency_penalty' is not supported"),
        ("presence_penalty", lambda v: v not in (None, 0), "'presence_penalty' is not supported"),
        ("logit_bias", lambda v: bool(v), "'logit_bias' is not supported"),
        ("stop", lambda v: bool(v), "stop sequences are not supported"),
        (
            "response_format",
            lambda v: v is not None and not (isinstance(v, dict) and v.get("type") == "text"),
            "only text responses are supported",
        ),
    ]
    for name, unsupported, message in checks:
        if unsupported(body.get(name)):
            raise refuse(message, name)


def image_parts(message: dict) -> list:
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [part for part in content if isinstance(part, dict) and part.get("type") in ("image_url", "input_image")]


def text_parts(message: dict) -> list[str]:
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]


def image_url(part: dict) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise refuse("an image_url part needs {'url': 'data:image/...;base64,...'}", "messages")
    return url.strip()


def max_tokens(body: dict) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise refuse(f"'{name}' must be a positive integer", name)
        return value
    return None


def finish_reason(result: CaptionResult) -> str:
    return "stop" if result.stopped else "length"


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(prompt_tokens: int, new_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": new_tokens, "total_tokens": prompt_tokens + new_tokens}


def completion(model_id: str, result: CaptionResult, prompt_tokens: int) -> dict:
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.caption, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(result),
            }
        ],
        "usage": usage(prompt_tokens, result.new_tokens),
    }


def completion_chunks(model_id: str, result: CaptionResult, prompt_tokens: int, include_usage: bool) -> list[str]:
    """The answer as OpenAI streams it: the role, the caption (in one piece: it is ready at once),
    the finish reason, the usage when asked for, then [DONE]."""
    common = {"id": completion_id(), "object": "chat.completion.chunk", "created": int(time.time()), "model": model_id}

    def chunk(delta: dict, finish_reason: str | None = None) -> dict:
        return {**common, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    events = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": result.caption}),
        chunk({}, finish_reason(result)),
    ]
    if include_usage:
        events.append({**common, "choices": [], "usage": usage(prompt_tokens, result.new_tokens)})
    return [f"data: {json.dumps(event)}\n\n" for event in events] + ["data: [DONE]\n\n"]


def model_list(model_id: str, created: int) -> dict:
    return {
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "blip-serve"}],
    }


def chat_completions_body() -> dict:
    """OpenAPI for POST /v1/chat/completions (the route reads the body itself)."""
    image_part = {
        "type": "object",
        "properties": {
            "type": {"const": "image_url"},
            "image_url": {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]},
        },
    }
    text_part = {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    message = {
        "type": "object",
        "properties": {
            "role": {"type": "string"},
            "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"oneOf": [image_part, text_part]}}]},
        },
    }
    schema = {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "description": "the id GET /v1/models lists"},
            "messages": {"type": "array", "items": message, "description": "the last user message: one image"},
            "max_tokens": {"type": "integer", "minimum": 1},
            "max_completion_tokens": {"type": "integer", "minimum": 1},
            "stream": {"type": "boolean"},
        },
    }
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "responses": {"200": {"description": "a chat.completion, or with stream: Server-Sent Events of chunks"}},
    }
