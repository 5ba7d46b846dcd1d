"""Read what a client sent: image bytes and caption options, from any of the bodies the API takes.

    multipart/form-data         field `file` (/caption: one; /captions: up to BLIP_MAX_FILES_PER_REQUEST)
                                and the text fields prompt, max_new_tokens, num_beams
    application/json            {"image": "<base64 or data: URL>", "prompt": ..., ...}   (/caption)
    image/* or octet-stream     the body is the image; options as query parameters      (/caption)

Every refusal is a ClientError whose message says what to send instead. A URL is never fetched.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartParser
from starlette.requests import Request

from blip_serve.api.http import CUT_OFF, multipart_complete
from blip_serve.formats import ACCEPTED_TEXT
from blip_serve.shared.errors import BadRequest, UnsupportedImage
from blip_serve.shared.settings import Settings

T = TypeVar("T")

# Starlette spools an uploaded file past 1 MB to a temporary file. Uploads stay in memory instead:
# the reading budget bounds them (BLIP_MAX_READING_BYTES), and a full or unwritable temporary
# directory then never fails an upload (it was a 500).
MultiPartParser.spool_max_size = 1 << 30

SEND_FILE = "send the image as multipart/form-data field 'file' (e.g. curl -F file=@photo.jpg)"
MISSING_FILE = f"missing form field 'file': {SEND_FILE}"
BODIES = 'multipart/form-data (field \'file\'), application/json ({"image": "<base64>"}) or the image itself'


@dataclass(frozen=True)
class CaptionOptions:
    prompt: str | None
    max_new_tokens: int
    num_beams: int


def option_errors(errors: list[dict], labels: dict[str, str] | None = None) -> str:
    """pydantic's errors for the options -> "'field': what is wrong", one per bad field; `labels`
    names a field as the client knows it (the OpenAI routes: 'max_tokens')."""
    labels = labels or {}
    named = ((".".join(map(str, error["loc"])), error["msg"]) for error in errors)
    return "; ".join(f"{labels.get(field, repr(field))}: {message}" for field, message in named)


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


def options_model(settings: Settings, max_new_tokens_limit: int) -> type[BaseModel]:
    """The options as a client sends them, with this server's limits: a bad value is a 400 that
    names the field and the limit. `max_new_tokens_limit`: the setting as TextLimits clamps it to
    the model's positions (its one home; /docs.json publishes the same)."""

    class CaptionOptionFields(BaseModel):
        model_config = ConfigDict(extra="ignore")
        prompt: str | None = Field(None, max_length=settings.max_prompt_chars, description="text BLIP continues")
        max_new_tokens: int | None = Field(None, ge=1, le=max_new_tokens_limit)
        num_beams: int | None = Field(None, ge=1, le=settings.max_beams)

    return CaptionOptionFields


class UploadReader:
    def __init__(self, settings: Settings, max_new_tokens_limit: int):
        self.settings = settings
        self.options = options_model(settings, max_new_tokens_limit)
        self.parsing = asyncio.Lock()  # JSON bodies are parsed one at a time (in_turn)

    def caption_options(
        self, values: dict, labels: dict[str, str] | None = None, params: dict[str, str] | None = None
    ) -> CaptionOptions:
        """The options in `values`, or a 400 naming the field: by `labels` in the message and
        `params` in the error's param, where the client knows the fields by other names."""
        present = {name: value for name, value in values.items() if value not in (None, "")}
        try:
            fields = self.options.model_validate(present)
        except ValidationError as exc:
            errors = exc.errors()
            field = str(errors[0]["loc"][0])
            raise BadRequest(option_errors(errors, labels), param=(params or {}).get(field, field)) from None
        return CaptionOptions(
            prompt=(fields.prompt or "").strip() or None,
            max_new_tokens=fields.max_new_tokens or self.settings.max_new_tokens,
            num_beams=fields.num_beams or 1,
        )

    async def read_one(self, request: Request) -> tuple[Upload, CaptionOptions]:
        """/caption: the image and options from a multipart, JSON or raw-image body."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            return await self.read_json(request)
        if content_type.startswith("image/") or content_type == "application/octet-stream":
            data = await request.body()
            return Upload("body", data), self.caption_options(dict(request.query_params))
        if content_type in ("multipart/form-data", "application/x-www-form-urlencoded", ""):
            form = await self.read_form(request, max_files=2)
            files = await self.file_parts(request, form)
            if len(files) > 1:
                raise BadRequest("send exactly one 'file' part; this request has several (POST /captions takes many)")
            return files[0], self.caption_options(text_fields(form))
        raise UnsupportedImage(f"a body of type {content_type!r} is not accepted: send {BODIES}")

    async def read_many(self, request: Request) -> tuple[list[Upload], CaptionOptions]:
        """/captions: every `file` part of a multipart body, and the options shared by all."""
        limit = self.settings.max_files_per_request
        form = await self.read_form(request, max_files=limit + 1)
        files = await self.file_parts(request, form)
        if len(files) > limit:
            raise BadRequest(f"send at most {limit} 'file' parts in one request; split the rest into more requests")
        return files, self.caption_options(text_fields(form))

    async def read_form(self, request: Request, max_files: int) -> FormData:
        content_type = request.headers.get("content-type", "").lower()
        if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            await request.body()  # read (and size-check) whatever came, then say what works
            raise BadRequest(MISSING_FILE)
        return await request.form(max_files=max_files, max_fields=100)

    async def file_parts(self, request: Request, form: FormData) -> list[Upload]:
        parts = form.getlist("file")
        if not parts:
            if multipart_complete(request) is False:
                raise BadRequest(CUT_OFF)
            raise BadRequest(MISSING_FILE)
        if not all(isinstance(part, UploadFile) for part in parts):
            raise BadRequest(f"the 'file' field must be an uploaded file, not text: {SEND_FILE}")
        return [Upload(part.filename or "", await part.read()) for part in parts]

    async def read_json(self, request: Request) -> tuple[Upload, CaptionOptions]:
        body, data = await self.in_turn(image_from_json, await request.body())
        return Upload("image", data), self.caption_options(body)

    async def read_json_body(self, request: Request, then: Callable[[object], T], expected: str) -> T:
        """A JSON body (/v1/chat/completions) parsed, and `then` of it, in turn."""
        return await self.in_turn(lambda body: then(parse_json(body, expected)), await request.body())

    async def in_turn(self, parse: Callable[[bytes], T], body: bytes) -> T:
        """Parse a JSON body in a thread (10 MB of JSON and base64 take ~50-90 ms), one at a time:
        while parsed it costs ~4x its size in copies (the text, the base64, the bytes), which the
        reading budget counts once; in turn, that is one body's worth, not one per request."""
        async with self.parsing:
            return await asyncio.to_thread(parse, body)


# A JSON body holds at most this many values (a count of `,`, `[` and `{`, which bounds them). A
# chat request has a few messages and parts; without it, 14 MB of `[],[],...` made 250 MB of Python
# lists per request and held the API's event loop for seconds (a JSON value costs ~25x its text).
MAX_JSON_VALUES = 100_000


def parse_json(text: bytes, expected: str) -> object:
    values = text.count(b",") + text.count(b"[") + text.count(b"{")
    if values > MAX_JSON_VALUES:
        raise BadRequest(f"the JSON body holds too many values (over {MAX_JSON_VALUES:,}): send {expected}")
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(f"the body is not valid JSON: send {expected}") from None
    except RecursionError:  # not a ValueError: without this, arrays nested 100,000 deep were a 500
        raise BadRequest(f"the JSON body is nested too deeply: send {expected}") from None


def image_from_json(text: bytes) -> tuple[dict, bytes]:
    """The JSON body and its image's bytes."""
    body = parse_json(text, '{"image": "<base64>", "prompt": ...}')
    if not isinstance(body, dict) or not isinstance(body.get("image"), str):
        raise BadRequest('the JSON body needs "image": the image\'s bytes in base64 (or a data: URL)')
    return body, decode_base64_image(body["image"])


def text_fields(form: FormData) -> dict:
    return {name: value for name, value in form.multi_items() if name != "file" and isinstance(value, str)}


def decode_base64_image(text: str) -> bytes:
    """The bytes of a base64 string or a `data:image/...;base64,` URL. A URL of any other kind is
    refused: the server never fetches anything."""
    text = text.strip()
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise BadRequest("a data: URL must be base64-encoded (data:image/png;base64,...)")
    elif "://" in text[:16]:
        raise BadRequest('"image" must hold the image\'s bytes in base64, not a URL: the server never fetches URLs')
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest('"image" is not valid base64') from None
    if not data:
        raise BadRequest('"image" is empty: send the image\'s bytes in base64')
    return data


def option_schemas(settings: Settings) -> dict:
    """The options' OpenAPI schemas, from the model that validates them (options_model): each
    field as a client sends it (a field left out takes its default). /docs.json sets the token
    limit to the one TextLimits enforces once the model is loaded (docs.set_token_limit)."""
    fields = options_model(settings, settings.max_new_tokens_limit).model_json_schema()["properties"]
    schemas = {}
    for name, field in fields.items():
        sent = next(branch for branch in field["anyOf"] if branch.get("type") != "null")  # X | None
        schemas[name] = {**sent, **({"description": field["description"]} if "description" in field else {})}
    return schemas


def caption_bodies(settings: Settings) -> dict:
    """OpenAPI for POST /caption's three bodies (the route reads the body itself)."""
    options = option_schemas(settings)
    image = {"type": "string", "format": "binary", "description": ACCEPTED_TEXT}
    raw = {"schema": {"type": "string", "format": "binary"}}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["file"], "properties": {"file": image, **options}}
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {
                            "image": {"type": "string", "description": "the image's bytes in base64, or a data: URL"},
                            **options,
                        },
                    }
                },
                "image/*": raw,
                "application/octet-stream": raw,
            },
        },
        "parameters": [
            {"name": name, "in": "query", "required": False, "schema": schema, "description": "with a raw image body"}
            for name, schema in options.items()
        ],
    }


def captions_body(settings: Settings) -> dict:
    """OpenAPI for POST /captions: up to BLIP_MAX_FILES_PER_REQUEST `file` parts."""
    files = {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "maxItems": settings.max_files_per_request,
    }
    schema = {"type": "object", "required": ["file"], "properties": {"file": files, **option_schemas(settings)}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}
