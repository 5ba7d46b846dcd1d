"""blip-serve: image captions from Salesforce's BLIP, served by BentoML with adaptive batching.

The request path, top to bottom, and the package each step lives in (the folder is the process):

    POST /caption (multipart field "file", JSON base64, or the raw image)  CaptionAPI.post_caption
      -> uploads.read_one: the image bytes and options, or a 4xx  blip_serve/api/uploads.py
      -> text_limits.check: prompt + max_new_tokens fit the model  blip_serve/api/text_limits.py
      -> a decode process: checks, bytes -> upright RGB -> (3, 384, 384) uint8  blip_serve/decoding/
      -> BlipModelService, on this API worker's channel: queued, seated with others  blip_serve/shared/channel.py,
         model/batcher.py, engine.py
      -> {"caption": "..."}, or {"error": "..."} with its status  blip_serve/api/http.py

    POST /captions (up to 32 "file" parts) takes the same path, all images in one model call, and
    answers {"captions": [{"filename", "caption"} or {"filename", "error", "status"}, ...]}.

CaptionAPI's processes never import torch (api/ and decoding/ may not: pyproject.toml's import
contracts); BlipModelService's one process owns BLIP (model/). BentoML's, uvicorn's and circus's
internals are touched in host/ alone. Settings are read once from BLIP_* environment variables
(blip_serve/shared/settings.py, README table); the routes are declared once (shared/routes.py).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time

import bentoml
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from blip_serve import __version__
from blip_serve.api.docs import DESCRIPTION, openapi_document
from blip_serve.api.docs import PAGE as DOCS_PAGE
from blip_serve.api.fetch import fetch_image
from blip_serve.api.http import JsonErrors, RequestGuard, RequestLog, install_error_handlers, log_fields, reading_more
from blip_serve.api.model_channel import ModelChannels
from blip_serve.api.model_client import model_service_ready, send_jobs
from blip_serve.api.openai_api import (
    chat_completions_body,
    chat_options,
    completion,
    completion_chunks,
    model_list,
    read_chat_request,
)
from blip_serve.api.text_limits import TextLimits
from blip_serve.api.uploads import CaptionOptions, UploadReader, caption_bodies, captions_body
from blip_serve.decoding.images import PreparedImage, ResizeSpec, return_freed_memory_to_os
from blip_serve.decoding.pool import Decoders
from blip_serve.host import home_lock, patches
from blip_serve.host.disconnect import CallerGone, until_disconnected
from blip_serve.host.drain import (
    CaptionsInFlight,
    Drain,
    InFlight,
    forget_dead_workers_gauges,
    running,
    service_workers,
)
from blip_serve.host.runner import service_address
from blip_serve.model import channel_server
from blip_serve.model.batcher import Batcher, CallDropped, MetricsObserver, QueueFull
from blip_serve.shared import channel, routes
from blip_serve.shared.errors import ClientError, PayloadTooLarge, ServiceError, Unauthorized
from blip_serve.shared.jobs import CaptionJob, CaptionResult
from blip_serve.shared.model_files import describe_source, model_dir, model_source, served_model_id
from blip_serve.shared.settings import load_settings

settings = load_settings()  # a bad BLIP_* value stops the server here, with one line
FETCH_HOSTS = settings.fetch_hosts()  # image URLs /v1/chat/completions may fetch: none by default
STARTED = int(time.time())
if home_lock.is_serve_supervisor():  # a second server under this BENTOML_HOME would wipe our /metrics
    home_lock.take()
    home_lock.check_port(*home_lock.serve_address())
    if settings.device == "cuda":  # checked once, before any worker starts (a worker would restart forever)
        from blip_serve.model.devices import require_cuda  # imports torch: the supervisor's, on request

        require_cuda()

# BLIP's files: a local directory, a hub model (downloaded when the server starts), or the model
# imported into BentoML's model store, which `bentoml build` packs into the bento.
MODEL_FILES = model_source(settings.model)
CAPTIONS_IN_FLIGHT = InFlight()  # this API worker's caption requests: what its drain waits for

# BentoML's OpenTelemetry middleware keeps every request's span alive (~5-20 KB a request, a
# steady RSS climb; BentoML issue #4760). Unless tracing is wanted, no URL is traced.
TRACING = {} if settings.tracing else {"excluded_urls": "/"}
# One access-log line per request: the project's (RequestLog), not BentoML's as well.
LOGGING = {"access": {"enabled": False}}

patches.apply()  # BentoML's and uvicorn's internals that a public endpoint cannot keep as they are

# The API workers' calls reach the model service on a WebSocket each (blip_serve/shared/channel.py),
# here where its address is an http:// one, else on each model worker's own socket.
channel_app = FastAPI()


@bentoml.asgi_app(channel_app, path=channel.PATH)
@bentoml.service(
    # One process per GPU: BentoML assigns the service this many GPUs and shows all of them to each
    # worker, and worker k uses the k-th. Where there is no GPU, the workers split the CPU's cores.
    resources={"gpu": settings.model_workers},
    workers=settings.model_workers,
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
        # torch's OpenMP threads sleep between operations instead of spinning (unless the operator
        # chose otherwise): spinning took CPU the API's decodes needed (docs/performance.md, "Why
        # the code does what it does"). Read when torch loads.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from blip_serve.model.captioner import BlipCaptioner  # torch and BLIP load in this process only

        self.worker = bentoml.server_context.worker_index or 1
        self.channels_open = bentoml.metrics.Gauge(
            name="blip_channels_open",
            documentation="Channels open from the API workers (one from each to each model worker)",
            multiprocess_mode="livesum",
        )
        self.captioner = BlipCaptioner(model_dir(self.model_files), settings, self.worker)
        self.batcher = Batcher(
            self.captioner.caption_jobs_async,
            max_batch_size=settings.max_batch_size,
            max_queued=settings.queued_images_limit(),
            observer=MetricsObserver(settings.max_batch_size),
            # A batch costs at most a full batch of default-length captions: a heavy image runs alone.
            max_batch_cost=settings.max_batch_size * settings.max_new_tokens,
            # Greedy captions take seats in the step-level decoder (blip_serve/model/engine.py).
            seats=self.captioner if self.captioner.engine is not None else None,
        )
        # On SIGTERM: serve on until the API workers have answered everything they accepted.
        self.drain = Drain(
            settings.drain_s,
            wait_for=lambda: service_workers(CaptionAPI.name),
            longest_s=settings.drain_s + settings.request_timeout_s,
        )

    @bentoml.on_startup
    def drain_on_sigterm(self) -> None:
        self.drain.install()
        forget_dead_workers_gauges()  # a worker that died left its queued and in-batch counts

    @bentoml.on_startup
    async def serve_worker_socket(self) -> None:
        """The channel on this worker's own socket, where the service's is a Unix socket (the API
        workers open a channel to each model worker: blip_serve/shared/channel.py)."""
        address = service_address(BlipModelService.name) or ""
        self.worker_socket = None
        if address.startswith("file://"):
            path = channel.worker_address(address, self.worker).removeprefix("file://")
            self.worker_socket = await channel_server.serve_worker_socket(
                path, self.batcher, self.worker, self.channels_open
            )

    @bentoml.on_shutdown
    async def close_worker_socket(self) -> None:
        if self.worker_socket is not None:
            await self.worker_socket.cleanup()

    @channel_app.websocket("/")
    async def serve_channel(self, websocket: WebSocket) -> None:
        """An API worker's calls (caption_batch's, without an HTTP request for each), where the
        service's address is an http:// one."""
        await channel_server.serve_channel(websocket, self.batcher, self.worker, self.channels_open)

    @bentoml.api
    async def model_info(self) -> dict:
        return self.captioner.describe()

    @bentoml.api
    async def caption_batch(
        self, jobs: list[CaptionJob], timeout_s: float, ctx: bentoml.Context, client: str = ""
    ) -> list[CaptionResult]:
        """One API request's images, batched with everyone else's by blip-serve's own policy
        (blip_serve/model/batcher.py): the calls of one `client` (its address) share one fair share.
        Dropped from the queue if the caller hangs up or `timeout_s` passes. The API workers make
        this call on their channel (serve_channel); as an HTTP API it serves a caller in one process."""
        try:
            return await until_disconnected(ctx.request, self.batcher.submit(jobs, timeout_s, client or None))
        except QueueFull as exc:
            raise bentoml.exceptions.ServiceUnavailable(f"the queue is full: {exc}") from None
        except CallDropped as exc:
            raise bentoml.exceptions.ServiceUnavailable(f"dropped from the queue: {exc}") from None
        except CallerGone:
            return [CaptionResult(error="the caller hung up", status=499)] * len(jobs)  # sent to nobody


class CaptionResponse(BaseModel):
    caption: str


class PartResult(BaseModel):
    filename: str
    caption: str | None = None
    error: str | None = None
    status: int = 200


class CaptionsResponse(BaseModel):
    captions: list[PartResult]


class ErrorResponse(BaseModel):
    error: str


class ServerInfo(BaseModel):
    """What is behind the URL."""

    name: str = "blip-serve"
    version: str = __version__
    model: str  # the model directory, hub id or stored model served
    random_weights: bool  # true for tools.tiny_model's models: gibberish captions
    device: str
    precision: str
    attention: str
    compiled: bool
    compiled_parts: list[str]  # BLIP_COMPILE: "vision" (CPU), "decoder"
    jpeg_decoder: str  # "api": decoded by the API service; "nvjpeg" or "pillow": by the model (BLIP_GPU_DECODE)
    torch_threads: int
    max_batch_size: int
    max_queued_images: int
    max_new_tokens: int
    max_new_tokens_limit: int
    max_beams: int
    max_files_per_request: int
    api_workers: int
    model_workers: int


app = FastAPI(
    title="blip-serve",
    version=__version__,
    description=DESCRIPTION,
    docs_url=None,  # / and /docs.json below: FastAPI's pages load Swagger UI from a CDN
    redoc_url=None,
    openapi_url=None,
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
    """Owns POST /caption and /captions: reads the upload, prepares each image, awaits BlipModelService."""

    model = bentoml.depends(BlipModelService)
    model_files = MODEL_FILES

    def __init__(self) -> None:
        patches.time_out_silent_connections(settings.header_timeout_s)  # clients' connections only
        files = model_dir(self.model_files)
        self.model_id = settings.served_model_name or served_model_id(self.model_files)
        self.text_limits = TextLimits.for_model(files, settings.max_new_tokens_limit)
        self.uploads = UploadReader(settings, self.text_limits.max_new_tokens_limit)
        self.model_loaded = False
        self.model_workers: frozenset[int] = frozenset()  # the model workers' pids when it last answered
        # A channel to each model worker (one per GPU), each call to the least busy; where the model
        # service has an http:// address and several workers, BentoML's client, whose connections
        # the kernel spreads over the workers.
        address = service_address(BlipModelService.name)
        addresses = channel.worker_addresses(address, settings.model_workers) if address else []
        self.channel = ModelChannels(addresses, address) if len(addresses) == settings.model_workers else None
        # Every upload is parsed and decoded in a child process under a CPU and a memory budget,
        # killed when its request ends. Large uploads take turns in a few low-priority processes:
        # N of them at once cost a few decodes' memory, not N, and they yield the cores to the
        # model and to small uploads, which have their own processes.
        self.decoders = Decoders.for_settings(settings, ResizeSpec.from_model_dir(files))
        return_freed_memory_to_os()  # request bodies go back to the OS once answered
        # On SIGTERM: /readyz 503 for BLIP_DRAIN_S, then exit once the caption requests are answered.
        self.drain = Drain(
            settings.drain_s, in_flight=CAPTIONS_IN_FLIGHT, longest_s=settings.drain_s + settings.request_timeout_s + 10
        )

    @bentoml.on_startup
    def drain_on_sigterm(self) -> None:
        self.drain.install()
        forget_dead_workers_gauges()  # a worker that died left its in-progress and queued counts

    @bentoml.on_startup
    async def start_decoders(self) -> None:
        await self.decoders.warm_up()

    @bentoml.on_shutdown
    async def close_channel(self) -> None:
        if self.channel:
            await self.channel.close()

    async def call_model(self, jobs: list[CaptionJob], timeout_s: float, client: str) -> list[CaptionResult]:
        """BlipModelService.caption_batch: on a channel to a model worker, else (one process: a
        test) through BentoML's client."""
        if self.channel:
            return await self.channel.call(jobs, timeout_s, client)
        return await self.model.to_async.caption_batch(jobs=jobs, timeout_s=timeout_s, client=client)

    async def __is_ready__(self) -> bool:  # BentoML's /readyz (async: no thread per probe)
        """Ready when not draining and the model service has answered its /readyz once. Asked first
        (within half a second), because BentoML's own check of the model service waits for it to come up
        (up to the traffic timeout) and then answers 500: a startup probe would hang ~2 minutes."""
        if self.drain.draining:
            return False
        # A model worker that died (or was replaced) since the model last answered: ask again. BentoML's
        # check would wait on the dead worker's socket (no answer for the whole reload); this is a 503.
        model_workers = frozenset(p.pid for p in service_workers(BlipModelService.name) if running(p))
        if model_workers != self.model_workers:
            self.model_loaded = False
        if not self.model_loaded:
            self.model_loaded = await model_service_ready(BlipModelService.name, timeout_s=0.5)
            self.model_workers = model_workers
        return self.model_loaded

    @app.get(routes.DOCS_PAGE.path, include_in_schema=False)
    async def docs_page(self) -> HTMLResponse:
        return HTMLResponse(DOCS_PAGE)

    @app.get(routes.DOCS_JSON.path, include_in_schema=False)
    async def docs_json(self) -> JSONResponse:
        return JSONResponse(openapi_document(app, self.text_limits.max_new_tokens_limit))

    @app.get(routes.INFO.path, response_model=ServerInfo)
    async def info(self) -> ServerInfo:
        """Which model and how it runs: device, precision, batching, limits, version."""
        return ServerInfo(
            model=describe_source(self.model_files),
            **(await self.model.to_async.model_info()),
            max_batch_size=settings.max_batch_size,
            max_queued_images=settings.queued_images_limit(),
            max_new_tokens=settings.max_new_tokens,
            max_new_tokens_limit=self.text_limits.max_new_tokens_limit,
            max_beams=settings.max_beams,
            max_files_per_request=settings.max_files_per_request,
            api_workers=settings.api_workers,
            model_workers=settings.model_workers,
        )

    @app.post(routes.CAPTION.path, response_model=CaptionResponse, openapi_extra=caption_bodies(settings))
    async def post_caption(self, request: Request) -> CaptionResponse:
        check_api_key(request)
        upload, options = await self.uploads.read_one(request)
        result = await self.caption_one(request, upload.data, options)
        return CaptionResponse(caption=result.caption)

    @app.post(routes.CHAT_COMPLETIONS.path, openapi_extra=chat_completions_body())
    async def chat_completions(self, request: Request) -> Response:
        """OpenAI's chat completions: the last user message's image_url (and text, the prompt)
        captioned by the same path as /caption (blip_serve/api/openai_api.py)."""
        check_api_key(request)
        call = await self.uploads.read_json_body(
            request,
            lambda body: read_chat_request(body, self.model_id, bool(FETCH_HOSTS)),
            "a chat completions request",
        )
        options = chat_options(self.uploads, call)
        # A fetched image is read into this worker like an upload: it counts in the reading budget.
        with reading_more(request, 0 if call.image is not None else settings.max_upload_bytes):
            data = call.image
            if data is None:
                data = await fetch_image(
                    call.url,
                    FETCH_HOSTS,
                    settings.max_upload_bytes,
                    settings.fetch_timeout_s,
                    settings.fetch_allow_private,
                )
            result = await self.caption_one(request, data, options)
        prompt_tokens = self.text_limits.start_length(options.prompt)
        if call.stream:
            events = completion_chunks(self.model_id, result, prompt_tokens, call.include_usage)
            return StreamingResponse(iter(events), media_type="text/event-stream")
        return JSONResponse(completion(self.model_id, result, prompt_tokens))

    @app.get(routes.MODELS.path)
    async def models(self, request: Request) -> JSONResponse:
        """OpenAI's model list: the one model this server serves."""
        check_api_key(request)
        return JSONResponse(model_list(self.model_id, STARTED))

    async def caption_one(self, request: Request, data: bytes, options: CaptionOptions) -> CaptionResult:
        """One image's caption, or its error raised: the path every single-image route takes."""
        self.text_limits.check(options.prompt, options.max_new_tokens)  # before the queue
        started = time.perf_counter()
        image = await self.prepare(data, request)
        decoded = time.perf_counter()
        [result] = await send_jobs(
            self.call_model,
            [caption_job(image, options)],
            settings.request_timeout_s,
            client_of(request),
        )
        log_fields(request).update(
            image=f"{image.width}x{image.height}",
            decode_ms=f"{(decoded - started) * 1000:.1f}",
            model_ms=f"{(time.perf_counter() - decoded) * 1000:.1f}",
        )
        if result.status != 200:
            raise ServiceError(result.error, status_code=result.status)
        return result

    @app.post(routes.CAPTIONS.path, response_model=CaptionsResponse, openapi_extra=captions_body(settings))
    async def post_captions(self, request: Request) -> CaptionsResponse:
        """Many images in one request: each is decoded on its own (a bad one fails alone), and every
        valid one goes to the model service in a single call."""
        check_api_key(request)
        uploads, options = await self.uploads.read_many(request)
        self.text_limits.check(options.prompt, options.max_new_tokens)
        started = time.perf_counter()
        prepared = await asyncio.gather(*(self.prepare(u.data, request) for u in uploads), return_exceptions=True)
        decoded = time.perf_counter()
        jobs = [caption_job(image, options) for image in prepared if isinstance(image, PreparedImage)]
        results = iter(
            await send_jobs(self.call_model, jobs, settings.request_timeout_s, client_of(request)) if jobs else []
        )

        answers = []
        for upload, image in zip(uploads, prepared):
            if isinstance(image, ClientError):
                answers.append(PartResult(filename=upload.filename, error=image.message, status=image.status_code))
            elif isinstance(image, BaseException):
                raise image
            else:
                result = next(results)
                answers.append(PartResult(filename=upload.filename, **result.model_dump()))
        log_fields(request).update(
            images=len(uploads),
            decode_ms=f"{(decoded - started) * 1000:.1f}",
            model_ms=f"{(time.perf_counter() - decoded) * 1000:.1f}",
        )
        return CaptionsResponse(captions=answers)

    async def prepare(self, data: bytes, request: Request) -> PreparedImage:
        """Decode and resize in a decode process, taking turns with other requests' images."""
        if len(data) > settings.max_upload_bytes:  # one part of a /captions body
            raise PayloadTooLarge(f"the image is larger than {settings.max_upload_bytes / 1024 / 1024:g} MB")
        return await self.decoders.prepare(data, owner=id(request.scope))


def caption_job(image: PreparedImage, options: CaptionOptions) -> CaptionJob:
    return CaptionJob(
        pixels=image.pixels,
        jpeg=image.jpeg,
        prompt=options.prompt,
        max_new_tokens=options.max_new_tokens,
        num_beams=options.num_beams,
    )


app.add_middleware(
    RequestGuard,
    max_bytes=settings.max_upload_bytes,
    path_max_bytes=routes.body_limits(settings),
    body_timeout_s=settings.body_timeout_s,
    request_timeout_s=settings.request_timeout_s,
    max_reading_bytes=settings.max_reading_bytes,
)
# Around every path, BentoML's own (/readyz, /metrics ...) too. BentoML makes the first added the
# outermost: CaptionsInFlight, then RequestLog, then JsonErrors, so the log has the status JsonErrors sends.
CaptionAPI.add_asgi_middleware(CaptionsInFlight, counter=CAPTIONS_IN_FLIGHT)  # what a drain waits for
CaptionAPI.add_asgi_middleware(RequestLog)
CaptionAPI.add_asgi_middleware(JsonErrors)


def client_of(request: Request) -> str:
    """Who sent the request, for the model's fair queue: the client's address (behind a proxy, the
    address it forwards: uvicorn takes X-Forwarded-For from the addresses FORWARDED_ALLOW_IPS trusts),
    so that more connections buy no larger share. One API key is shared by every client: no identity."""
    address = request.client.host if request.client else ""
    log_fields(request)["client"] = address
    return address


def check_api_key(request: Request) -> None:
    """With BLIP_API_KEY set, /caption wants `Authorization: Bearer <key>`; health endpoints stay open."""
    if not settings.api_key:
        return
    sent = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(sent, f"Bearer {settings.api_key}".encode()):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")
