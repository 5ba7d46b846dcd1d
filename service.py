"""blip-serve: image captions from Salesforce's BLIP, served by BentoML with adaptive batching.

The request path, top to bottom:

    POST /caption (multipart field "file")                      CaptionAPI.post_caption, async
      -> text_limits.check: prompt + max_new_tokens fit the model  blip_serve/text_limits.py
      -> prepare_image: bytes -> upright RGB -> (3, 384, 384) uint8  blip_serve/images.py
      -> BlipModelService.caption_batch: adaptive batch, one generate  blip_serve/model.py
      -> {"caption": "..."}, or {"error": "..."} with its status  blip_serve/http.py

CaptionAPI's processes never import torch; BlipModelService's one process owns BLIP. Settings are
read once from BLIP_* environment variables (blip_serve/settings.py, README table).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import bentoml
from fastapi import FastAPI, File, Form, Request, UploadFile
from pydantic import BaseModel

from blip_serve import server_patches
from blip_serve.errors import BadRequest, ServiceError, Unauthorized
from blip_serve.http import JsonErrors, RequestGuard, RequestLog, install_error_handlers, log_fields
from blip_serve.images import (
    ACCEPTED_TEXT,
    LARGE_IMAGE_PIXELS,
    ImageLimits,
    ResizeSpec,
    declared_pixels,
    lower_thread_priority,
    prepare_image,
    return_freed_memory_to_os,
)
from blip_serve.jobs import CaptionJob, CaptionResult
from blip_serve.model_client import send_jobs
from blip_serve.model_files import model_dir, model_source
from blip_serve.settings import load_settings
from blip_serve.text_limits import TextLimits

settings = load_settings()  # a bad BLIP_* value stops the server here, with one line

# BLIP's files: a local directory, a hub model (downloaded when the server starts), or the model
# imported into BentoML's model store, which `bentoml build` packs into the bento.
MODEL_FILES = model_source(settings.model)

# BentoML's OpenTelemetry middleware keeps every request's span alive (~5-20 KB a request, a
# steady RSS climb; BentoML issue #4760). Unless tracing is wanted, no URL is traced.
TRACING = {} if settings.tracing else {"excluded_urls": "/"}
# One access-log line per request: the project's (RequestLog), not BentoML's as well.
LOGGING = {"access": {"enabled": False}}

server_patches.bound_metric_labels()


@bentoml.service(
    resources={"gpu": 1},  # takes a GPU where there is one; runs on the CPU where there is none
    workers=1,
    traffic={"timeout": settings.request_timeout_s},
    tracing=TRACING,
    logging=LOGGING,
    # CaptionAPI's client for this service otherwise closes and reopens its connection pool every
    # 100 requests, failing the requests in flight (BentoML issues #5540, #5544).
    runner_connection={"max_requests": 2**31 - 1, "max_age": 7 * 24 * 3600.0},
)
class BlipModelService:
    """Owns BLIP in one process; captions whole batches of prepared images."""

    model_files = MODEL_FILES

    def __init__(self) -> None:
        from blip_serve.model import BlipCaptioner  # torch and BLIP load in this process only

        self.captioner = BlipCaptioner(model_dir(self.model_files), settings)

    @bentoml.api(batchable=True, max_batch_size=settings.max_batch_size, max_latency_ms=settings.max_latency_ms)
    def caption_batch(self, jobs: list[CaptionJob]) -> list[CaptionResult]:
        return self.captioner.caption_jobs(jobs)


class CaptionResponse(BaseModel):
    caption: str


class ErrorResponse(BaseModel):
    error: str


app = FastAPI(
    title="blip-serve",
    description='Image captioning with BLIP. Every error is a JSON object {"error": "..."}.',
    responses={status: {"model": ErrorResponse} for status in (400, 401, 408, 413, 415, 500, 503, 504)},
)
install_error_handlers(app)


@bentoml.service(
    workers=settings.api_workers,
    # BentoML's own timeout is a backstop: RequestGuard answers first, as JSON, with the request id.
    traffic={"timeout": settings.request_timeout_s + 10},
    tracing=TRACING,
    logging=LOGGING,
)
@bentoml.asgi_app(app, path="/")
class CaptionAPI:
    """Owns POST /caption: checks the request, prepares the image, awaits BlipModelService."""

    model = bentoml.depends(BlipModelService)
    model_files = MODEL_FILES

    def __init__(self) -> None:
        server_patches.time_out_silent_connections(settings.header_timeout_s)  # clients' connections only
        files = model_dir(self.model_files)
        self.resize = ResizeSpec.from_model_dir(files)
        self.text_limits = TextLimits.for_model(files, settings.max_new_tokens_limit)
        self.image_limits = ImageLimits(settings.max_image_pixels, settings.max_image_side, settings.max_aspect_ratio)
        # Large uploads take turns in a few low-priority threads: N of them at once cost a few
        # decodes' memory, not N, and they yield the cores to the model and to small uploads,
        # which skip the queue.
        slots = settings.max_concurrent_decodes or max(1, len(os.sched_getaffinity(0)) // 2)
        self.large_decodes = ThreadPoolExecutor(slots, "large-decode", initializer=lower_thread_priority)
        return_freed_memory_to_os()

    @app.post("/caption", response_model=CaptionResponse)
    async def post_caption(
        self,
        request: Request,
        file: Annotated[UploadFile, File(description=f"the image: {ACCEPTED_TEXT}")],
        prompt: Annotated[
            str | None,
            Form(
                max_length=settings.max_prompt_chars, description='text for BLIP to continue, e.g. "a photography of"'
            ),
        ] = None,
        max_new_tokens: Annotated[
            int | None, Form(ge=1, le=settings.max_new_tokens_limit, description="caption length cap in tokens")
        ] = None,
        num_beams: Annotated[int | None, Form(ge=1, le=settings.max_beams, description="beam search width")] = None,
    ) -> CaptionResponse:
        check_api_key(request)
        if len((await request.form()).getlist("file")) > 1:
            raise BadRequest("send exactly one 'file' part; this request has several")
        job_prompt = (prompt or "").strip() or None
        job_tokens = max_new_tokens or settings.max_new_tokens
        self.text_limits.check(job_prompt, job_tokens)  # before the queue: a bad job never joins a batch

        data = await file.read()
        started = time.perf_counter()
        if declared_pixels(data) > LARGE_IMAGE_PIXELS:
            decoding = asyncio.get_running_loop().run_in_executor(
                self.large_decodes, prepare_image, data, self.image_limits, self.resize
            )
        else:  # Pillow is CPU work: off the event loop either way
            decoding = asyncio.to_thread(prepare_image, data, self.image_limits, self.resize)
        image = await decoding
        decoded = time.perf_counter()

        job = CaptionJob(pixels=image.pixels, prompt=job_prompt, max_new_tokens=job_tokens, num_beams=num_beams or 1)
        [result] = await send_jobs(self.model.to_async.caption_batch, [job])
        log_fields(request).update(
            image=f"{image.width}x{image.height}",
            decode_ms=f"{(decoded - started) * 1000:.1f}",
            model_ms=f"{(time.perf_counter() - decoded) * 1000:.1f}",
        )
        if result.status != 200:
            raise ServiceError(result.error, status_code=result.status)
        return CaptionResponse(caption=result.caption)


app.add_middleware(
    RequestGuard,
    max_bytes=settings.max_upload_bytes,
    body_timeout_s=settings.body_timeout_s,
    request_timeout_s=settings.request_timeout_s,
)
# Around every path, BentoML's own (/readyz, /metrics ...) too: RequestLog outermost, so it logs the
# status JsonErrors sends.
CaptionAPI.add_asgi_middleware(RequestLog)
CaptionAPI.add_asgi_middleware(JsonErrors)


def check_api_key(request: Request) -> None:
    """With BLIP_API_KEY set, /caption wants `Authorization: Bearer <key>`; health endpoints stay open."""
    if not settings.api_key:
        return
    sent = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(sent, f"Bearer {settings.api_key}".encode()):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")
