"""blip-serve: image captions from Salesforce's BLIP, served by BentoML with adaptive batching.

The request path, top to bottom:

    POST /caption (multipart field "file")                     CaptionAPI, async, one per request
      -> decode_image: bytes -> upright RGB image, or a 4xx     blip_serve/images.py
      -> preprocess: image -> (3, 384, 384) float32 array       blip_serve/model.py
      -> BlipModel.caption: adaptive batch -> one generate      BlipModel, one process owning the model
      -> {"caption": "..."}

Configuration is read once from BLIP_* environment variables (blip_serve/settings.py, README table).
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated

import aiohttp
import bentoml
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI, File, Form, Request, UploadFile
from pydantic import BaseModel

from blip_serve.errors import BadRequest, Unauthorized, Unavailable
from blip_serve.http import RequestLogMiddleware, UploadLimitMiddleware, install_error_handlers
from blip_serve.images import ACCEPTED_TEXT, decode_image
from blip_serve.model import BlipCaptioner, CaptionJob, load_image_processor, model_dir, model_source, preprocess
from blip_serve.settings import Settings

settings = Settings.from_env()

# BLIP's files: a local directory, a hub model (downloaded by BentoML), or the model imported into
# BentoML's model store, which `bentoml build` packs into the bento (see model_source).
MODEL_FILES = model_source(settings.model)


# BentoML's OpenTelemetry middleware keeps every request's span alive (~5-20 KB a request, a
# steady RSS climb; BentoML issue #4760). Unless tracing is wanted, no URL is traced.
TRACING = {} if settings.tracing else {"excluded_urls": "/"}


@bentoml.service(
    resources={"gpu": 1},  # takes a GPU where there is one; runs on the CPU where there is none
    workers=1,
    traffic={"timeout": settings.request_timeout_s},
    tracing=TRACING,
    # CaptionAPI's client for this service otherwise closes and reopens its connection pool every
    # 100 requests, failing the requests in flight (BentoML issues #5540, #5544).
    runner_connection={"max_requests": 2**31 - 1, "max_age": 7 * 24 * 3600.0},
)
class BlipModel:
    """Owns BLIP; captions whole batches of preprocessed images."""

    model_files = MODEL_FILES

    def __init__(self) -> None:
        self.captioner = BlipCaptioner(model_dir(self.model_files), settings)

    @bentoml.api(batchable=True, max_batch_size=settings.max_batch_size, max_latency_ms=settings.max_latency_ms)
    def caption(self, jobs: list[CaptionJob]) -> list[str]:
        return self.captioner.caption(jobs)


class Caption(BaseModel):
    caption: str


class ErrorBody(BaseModel):
    error: str


app = FastAPI(
    title="blip-serve",
    description="Image captioning with BLIP. Every error is a JSON object {\"error\": \"...\"}.",
    responses={status: {"model": ErrorBody} for status in (400, 401, 413, 415, 500, 503)},
)
install_error_handlers(app)
app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes)
app.add_middleware(RequestLogMiddleware)  # added last: runs first, so it sees every status


@bentoml.service(workers=settings.api_workers, traffic={"timeout": settings.request_timeout_s}, tracing=TRACING)
@bentoml.asgi_app(app, path="/")
class CaptionAPI:
    """Owns POST /caption: validates and decodes the upload, then awaits a caption from BlipModel."""

    blip = bentoml.depends(BlipModel)
    model_files = MODEL_FILES

    def __init__(self) -> None:
        self.image_processor = load_image_processor(model_dir(self.model_files))

    @app.post("/caption", response_model=Caption)
    async def caption(
        self,
        request: Request,
        file: Annotated[UploadFile, File(description=f"the image: {ACCEPTED_TEXT}")],
        prompt: Annotated[
            str | None,
            Form(max_length=settings.max_prompt_chars, description='text for BLIP to continue, e.g. "a photography of"'),
        ] = None,
        max_new_tokens: Annotated[
            int | None, Form(ge=1, le=settings.max_new_tokens_limit, description="caption length cap in tokens")
        ] = None,
        num_beams: Annotated[int | None, Form(ge=1, le=settings.max_beams, description="beam search width")] = None,
    ) -> Caption:
        check_api_key(request)
        if len((await request.form()).getlist("file")) > 1:
            raise BadRequest("send exactly one 'file' part; this request has several")
        data = await file.read()
        # Pillow and the image processor are CPU work: keep them off the event loop.
        pixel_values, size = await asyncio.to_thread(self.decode_and_preprocess, data)
        request.state.image_size = size
        job = CaptionJob(
            pixel_values=pixel_values,
            prompt=(prompt or "").strip() or None,
            max_new_tokens=max_new_tokens or settings.max_new_tokens,
            num_beams=num_beams or 1,
        )
        text = await self.caption_job(job)
        return Caption(caption=text)

    async def caption_job(self, job: CaptionJob) -> str:
        """Await BlipModel's batched caption; its failures become 503s the client may retry."""
        try:
            try:
                [text] = await self.blip.to_async.caption([job])
            except Exception as exc:
                if not lost_in_connection_pool(exc):
                    raise
                [text] = await self.blip.to_async.caption([job])  # once more, on a fresh connection
        except BentoMLException as exc:
            if exc.error_code != 503:
                raise
            raise Unavailable("the server is at capacity; retry shortly") from None
        except Exception as exc:
            if not lost_in_connection_pool(exc):
                raise
            # Twice: the model worker is gone, and BentoML's supervisor is starting a new one.
            raise Unavailable("the captioning model is restarting; retry shortly") from None
        return text

    def decode_and_preprocess(self, data: bytes):
        image = decode_image(data, settings.max_image_pixels)
        return preprocess(self.image_processor, image), f"{image.width}x{image.height}"


def lost_in_connection_pool(exc: Exception) -> bool:
    """A call to BlipModel lost to the connection, not to the model: a keep-alive connection the
    model server had closed, BentoML's client refreshing its session mid-request (every 100
    requests; BentoML issues #4971 and #5544), or a model worker that died. Safe to send again."""
    return isinstance(exc, aiohttp.ClientConnectionError) or (
        isinstance(exc, RuntimeError) and "Session is closed" in str(exc)
    )


def check_api_key(request: Request) -> None:
    """With BLIP_API_KEY set, /caption wants `Authorization: Bearer <key>`; health endpoints stay open."""
    if not settings.api_key:
        return
    sent = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(sent, f"Bearer {settings.api_key}".encode()):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")
