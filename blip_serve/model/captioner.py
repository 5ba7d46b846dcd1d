"""The model process: load BLIP on its device and caption batches of CaptionJobs.

Only this process imports torch and BLIP's modeling code. It finishes BLIP's preprocessing (rescale
and normalize of the API's uint8 arrays, as transformers does them) on the device, and answers each
job on its own: a job that fails does not fail the others in its batch.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import types
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BlipForConditionalGeneration, BlipProcessor
from transformers.models.blip.modeling_blip import BlipAttention

from blip_serve import __version__
from blip_serve.model.device_images import DeviceJpegs, UndecodableJpeg
from blip_serve.model.devices import pick_compile, pick_device, pick_precision, pick_torch_threads
from blip_serve.model.engine import Finished, SeatEngine, unsupported_settings
from blip_serve.shared.jobs import CaptionJob, CaptionResult, group_jobs
from blip_serve.shared.model_config import decoder_prompt, image_processor_config
from blip_serve.shared.model_files import RANDOM_WEIGHTS, first_line
from blip_serve.shared.settings import Settings, cxx_compiler

logger = logging.getLogger("bentoml.blip_serve")
# The vision work of a client that holds more seats than another, between two steps: half a step's
# time. With a whole step, a one-connection client beside a 64-connection one waited 3-4.7x alone
# (p95; each of its steps took twice as long); half: 2.5x; a quarter: 2.6x, the other starved more
# (docs/performance.md, "The step-level decoder").
SPREAD_SHARE = 0.5
# The most vision work one call between two steps runs, for any client: a newcomer's image waits
# behind at most this much of others' encoding. Unbounded, images left waiting ran whole in one call
# once spreading stopped: 15.8 s of 12 images, which a new client's first request waited for.
ENCODE_TURN_S = 1.0


class JobRejected(ValueError):
    """A job the model service refuses before generating: its client gets `status` with this text."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def sdpa_attention_forward(self: BlipAttention, hidden_states: torch.Tensor, **kwargs) -> tuple:
    """BLIP's vision attention through torch's fused scaled_dot_product_attention.

    Same maths as BlipAttention.forward (no mask, no dropout at inference); transformers 5.x does
    not offer `attn_implementation="sdpa"` for BLIP, so the project swaps this in itself.
    """
    batch, length, embed_dim = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim)
    query, key, value = qkv.permute(2, 0, 3, 1, 4)
    context = F.scaled_dot_product_attention(query, key, value, scale=self.scale)
    context = context.transpose(1, 2).reshape(batch, length, embed_dim)
    return self.projection(context), None


def use_sdpa_attention(model: torch.nn.Module) -> None:
    """Point every BlipAttention in `model` at the SDPA forward."""
    for module in model.modules():
        if isinstance(module, BlipAttention):
            module.forward = types.MethodType(sdpa_attention_forward, module)


def apply_precision(model: BlipForConditionalGeneration, precision: str) -> torch.dtype:
    """Cast the model for `precision`; returns the dtype its pixel input must have."""
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        model.half()
        return torch.float16
    if precision == "bf16":
        model.to(torch.bfloat16)
        return torch.bfloat16
    if precision == "hybrid":
        # The vision tower (~85% of the FLOPs) in bf16, the decoder that picks tokens in fp32 (the
        # steps keep its keys and values over the image in bf16: engine.SeatEngine's image_dtype).
        model.vision_model.to(torch.bfloat16)

        def image_embeds_to_fp32(module, inputs, output):
            output.last_hidden_state = output.last_hidden_state.float()
            return output

        model.vision_model.register_forward_hook(image_embeds_to_fp32)
        return torch.bfloat16
    raise ValueError(f"unknown precision {precision!r}")


class PackedLinear(torch.nn.Module):
    """An fp32 nn.Linear whose weight oneDNN reordered once, into the blocks its kernels read. With
    the few rows of a decoder step (2-3 captions beside another client) MKL's fp32 matrix product,
    which nn.Linear calls, took 2-3x its one-row time; oneDNN's barely more than its one row
    (docs/performance.md). Not bit for bit with nn.Linear: `hybrid` only, never the exact fp32."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, self.in_features)
        output = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return output.view(*hidden.shape[:-1], self.out_features)


def pack_linears(module: torch.nn.Module) -> None:
    """Swap every fp32 nn.Linear under `module` for a PackedLinear."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear) and child.weight.dtype == torch.float32:
            setattr(module, name, PackedLinear(child))
        else:
            pack_linears(child)


class PixelNormalizer:
    """Rescale and normalize as BLIP's image processor does (uint8 -> float64 x rescale_factor ->
    float32, then (x - mean) / std in float32), as a lookup: a uint8 has 256 values, so the
    processor's operations run once per value and channel (on the CPU, in its order: the same
    float32 values as transformers' numpy code, bit for bit), and each pixel is one table read
    (a seventh of the CPU of computing it per pixel: docs/performance.md). For a bf16 or fp16
    model the table holds the float32 values cast to that dtype, which is what casting the float32
    pixels would give, value for value, in one pass instead of two."""

    def __init__(self, model_dir: str, device: str):
        config = image_processor_config(model_dir)
        scale = float(config.get("rescale_factor", 1 / 255))
        mean = torch.tensor(config["image_mean"], dtype=torch.float32).view(3, 1)
        std = torch.tensor(config["image_std"], dtype=torch.float32).view(3, 1)
        levels = torch.arange(256, dtype=torch.float64).view(1, 256)
        self.table = ((levels * scale).to(torch.float32) - mean) / std  # (3, 256) float32, on the CPU
        self.device = device
        self.device_table = self.table.to(device)
        # numpy has no bfloat16: its table is read as 16-bit integers, the result viewed as bf16
        self.cpu_tables = {
            dtype: self.table.to(dtype).view(torch.int16 if dtype == torch.bfloat16 else dtype).numpy()
            for dtype in (torch.float32, torch.float16, torch.bfloat16)
        }

    def __call__(self, pixels: Sequence[np.ndarray] | np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, 3, H, W) uint8 (an array, or a list of (3, H, W) arrays) -> (N, 3, H, W) `dtype` on the device."""
        if self.device != "cpu":
            return self.on_device(torch.from_numpy(np.stack(pixels))).to(dtype)
        table = self.cpu_tables[dtype]
        normalized = np.empty((len(pixels), *pixels[0].shape), table.dtype)
        # An image and a channel at a time: contiguous reads and writes, and no stacked copy of the
        # uploads (0.4 ms an image for bf16 against 1.8 for stack, lookup and cast: docs/performance.md)
        for index, image in enumerate(pixels):
            for channel in range(len(table)):
                np.take(table[channel], image[channel], out=normalized[index, channel])
        values = torch.from_numpy(normalized)
        return values.view(torch.bfloat16) if dtype == torch.bfloat16 else values

    def on_device(self, batch: torch.Tensor) -> torch.Tensor:
        """The lookup in torch, where the pixels are: uint8 crosses to a GPU, four times smaller
        than float32."""
        if self.device.startswith("cuda"):  # page-locked memory: the copy to the GPU runs asynchronously
            batch = batch.pin_memory()
        return self.lookup(batch.to(self.device, non_blocking=True))

    def lookup(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 on the device -> float32 there."""
        normalized = torch.empty(batch.shape, dtype=torch.float32, device=self.device)
        for channel in range(3):
            normalized[:, channel] = self.device_table[channel][batch[:, channel].to(torch.int64)]
        return normalized


def in_halves(items: list, run, fail) -> None:
    """`run(items)`; if it raises, split `items` in halves and run each the same way, down to one
    item, which gets `fail(item, exc)`: the items that work are done, and one that fails fails
    alone. Costs nothing while every item works."""
    try:
        run(items)
    except Exception as exc:
        if len(items) == 1:
            fail(items[0], exc)
            return
        middle = len(items) // 2
        in_halves(items[:middle], run, fail)
        in_halves(items[middle:], run, fail)


class BlipCaptioner:
    """BLIP on one device, captioning lists of CaptionJobs."""

    def __init__(self, model_dir: str, settings: Settings, worker: int = 1):
        self.device = pick_device(settings.device, worker)
        self.precision = pick_precision(settings.precision, self.device)
        if self.device == "cpu":
            torch.set_num_threads(pick_torch_threads(settings.torch_threads, settings.model_workers))
        self.threads = torch.get_num_threads()
        self.processor = BlipProcessor.from_pretrained(model_dir)
        model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
        if settings.attention == "sdpa":
            use_sdpa_attention(model)
        self.input_dtype = apply_precision(model, self.precision)
        self.model = model.to(self.device)
        self.normalize = PixelNormalizer(model_dir, self.device)
        size = image_processor_config(model_dir)["size"]
        self.pixel_shape = (3, size["height"], size["width"])
        self.device_jpegs = DeviceJpegs(self.device, *self.pixel_shape[1:]) if settings.gpu_decode else None
        self.positions = model.config.text_config.max_position_embeddings
        self.min_new_tokens = settings.min_new_tokens
        # Every model call runs on this one thread. BentoML calls a sync API from a pool of
        # threads, and CUDA graph trees are per thread: from a pool, BLIP_COMPILE re-recorded its
        # graphs on most calls (docs/performance.md).
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blip-model")
        # Greedy captions decode step by step in seats (engine.py), unless the model's generation
        # config asks for logits processors the engine does not apply: then everything goes to generate.
        unsupported = unsupported_settings(self.model)
        if unsupported:
            logger.warning(
                "greedy captions run as whole batches: the generation config sets %s", ", ".join(unsupported)
            )
        compile_model = pick_compile(settings.compile, self.device, self.precision)
        if compile_model and not cxx_compiler():  # BLIP_COMPILE=auto (settings refuse `on` without one)
            logger.warning(
                "BLIP_COMPILE=auto would compile %s here, but no C++ compiler was found ($CXX, else g++): "
                "serving uncompiled; install g++ to compile",
                self.precision,
            )
            compile_model = False
        self.engine = None
        ahead_of_time = compile_model and self.device == "cpu"  # AOTInductor packages (compiled.py)
        if not unsupported:  # a tower compiled as a whole (on a CPU) runs spread images through its eager layers
            gpu_compile = compile_model and not ahead_of_time
            image_dtype = torch.bfloat16 if self.precision == "hybrid" else None  # the tower's
            self.engine = SeatEngine(
                self.model, settings.max_batch_size, gpu_compile, piecewise=not ahead_of_time, image_dtype=image_dtype
            )
        # After the engine took its bf16 copies of the image key/value projections (a PackedLinear
        # cannot be cast). The decoder is hybrid's fp32 part; the exact fp32 stays on nn.Linear.
        if self.device == "cpu" and self.precision == "hybrid" and torch.backends.mkldnn.is_available():
            pack_linears(self.model.text_decoder)
        self.compiled_parts = []
        if compile_model:
            if settings.compile_cache:  # inductor reads it when it first caches: before any compile
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = settings.compile_cache
            from blip_serve.model.compiled import stopped_at_once

            logger.info("BLIP_COMPILE: loading the compiled model, or compiling it (minutes at a first start)")
            with stopped_at_once():  # a Ctrl-C or SIGTERM meanwhile stops the process at once
                self.thread.submit(self.compile_model, model_dir, settings).result()
        self.attention = settings.attention
        self.random_weights = (Path(model_dir) / RANDOM_WEIGHTS).exists()
        logger.info(
            "blip-serve %s: BLIP loaded from %s%s on %s, precision %s, attention %s, torch threads %d, "
            "model worker %d, compiled %s, batches up to %d",
            __version__,
            model_dir,
            " (RANDOM WEIGHTS: gibberish captions)" if self.random_weights else "",
            self.device,
            self.precision,
            settings.attention,
            self.threads,
            worker,
            "+".join(self.compiled_parts) or "no",
            settings.max_batch_size,
        )

    def describe(self) -> dict:
        """What runs here, for GET /info."""
        return {
            "device": self.device,
            "precision": self.precision,
            "attention": self.attention,
            "compiled": bool(self.compiled_parts),
            "compiled_parts": self.compiled_parts,
            "jpeg_decoder": self.device_jpegs.decoder if self.device_jpegs else "api",
            "torch_threads": self.threads,
            "random_weights": self.random_weights,
        }

    def compile_model(self, model_dir: str, settings: Settings) -> None:
        """BLIP_COMPILE, before /readyz turns 200. Every size is symbolic: nothing compiles while serving."""
        started = time.monotonic()
        if self.device == "cpu":
            try:
                how = self.compile_ahead_of_time(model_dir, settings)
            except Exception as exc:  # a broken toolchain, a full disk: serve what is not compiled
                # (a part is swapped in only once its package loaded), rather than fail every restart
                logger.error(
                    "BLIP_COMPILE: compiling failed (%s: %s); serving with %s compiled",
                    type(exc).__name__,
                    first_line(exc),
                    "+".join(self.compiled_parts) or "nothing",
                )
                if self.engine is not None and "vision" not in self.compiled_parts:
                    self.engine.piecewise = True  # an eager tower is encoded layer by layer, as uncompiled
                return
        else:
            how = self.compile_at_first_calls()
        logger.info("BLIP_COMPILE: ready in %.0f s (%s)", time.monotonic() - started, how)

    def compile_ahead_of_time(self, model_dir: str, settings: Settings) -> str:
        """On a CPU: the vision tower and the engine's decoder step as AOTInductor packages
        (compiled.py), loaded from BLIP_COMPILE_CACHE where a start before made them. A package's
        first call costs what any call does (measured): nothing to warm up."""
        from blip_serve.model import compiled

        folder = settings.compile_cache or compiled.default_folder()
        weights = compiled.weights_id(model_dir)
        largest = max(settings.max_batch_size, 2)
        loaded = compiled.compile_vision(
            self.model.vision_model, self.pixel_shape, self.input_dtype, self.precision, largest, folder, weights
        )
        self.compiled_parts.append("vision")
        sources = [f"vision {'loaded' if loaded else 'compiled'}"]
        if self.engine is not None:
            loaded = compiled.compile_step(self.engine, folder, weights, self.precision)
            self.compiled_parts.append("decoder")
            sources.append(f"decoder {'loaded' if loaded else 'compiled'}")
        return f"{', '.join(sources)}; packages in {folder}"

    def compile_at_first_calls(self) -> str:
        """On a GPU: torch.compile of the engine's step (SeatEngine), which compiles at its first
        calls: a caption of one image and one of two run here. Inductor's cache keeps the kernels."""
        from torch._dynamo.utils import counters

        if self.engine is None:
            return "nothing to compile: captions run as whole batches"
        self.compiled_parts.append("decoder")
        blank = np.zeros(self.pixel_shape, dtype=np.uint8)
        for images in (1, 2):
            jobs = [CaptionJob(pixels=blank, max_new_tokens=3)] * images
            self.join_here([object() for _ in jobs], jobs)
            while self.engine.busy_seats():
                self.step_here()
        cache = counters["inductor"]
        hits, graphs = cache["fxgraph_cache_hit"], cache["fxgraph_cache_hit"] + cache["fxgraph_cache_miss"]
        folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default folder")
        return f"{hits} of {graphs} graphs from the cache in {folder}"

    def caption_jobs(self, jobs: list[CaptionJob]) -> list[CaptionResult]:
        """One result per job, in order. Jobs that share prompt and options share one generate."""
        return self.thread.submit(self.caption_jobs_here, jobs).result()

    async def caption_jobs_async(self, jobs: list[CaptionJob]) -> list[CaptionResult]:
        """caption_jobs for an event loop: it waits for the model's thread without blocking the loop."""
        return await asyncio.wrap_future(self.thread.submit(self.caption_jobs_here, jobs))

    def caption_jobs_here(self, jobs: list[CaptionJob]) -> list[CaptionResult]:
        results: list[CaptionResult | None] = [None] * len(jobs)
        for indices in group_jobs(jobs):
            self.caption_group(jobs, indices, results)
        return results  # type: ignore[return-value]

    def caption_group(self, jobs: list[CaptionJob], indices: list[int], results: list) -> None:
        """Caption jobs[indices] in one generate (in halves where it fails: `in_halves`)."""

        def run(group: list[int]) -> None:
            for index, result in zip(group, self.generate([jobs[i] for i in group])):
                results[index] = result

        def fail(index: int, exc: Exception) -> None:
            results[index] = self.failure(exc)

        in_halves(indices, run, fail)

    def failure(self, exc: Exception) -> CaptionResult:
        if isinstance(exc, JobRejected):
            return CaptionResult(error=str(exc), status=exc.status)
        logger.error("generate failed for one job", exc_info=exc)
        return CaptionResult(error="internal error: the model failed on this image; see the server log", status=500)

    # The step-level engine's side of the batcher (batcher.Seats): called by the batcher's loop only.

    def fits(self, job: CaptionJob) -> bool:
        return self.engine is not None and job.num_beams == 1

    def free_seats(self) -> int:
        return self.engine.free_seats()

    def busy_seats(self) -> int:
        return self.engine.busy_seats()

    def waiting_to_encode(self) -> list[object]:
        return [image.ticket for image in self.engine.encoding]

    def release(self, ticket: object) -> None:
        self.engine.release(ticket)

    def last_step(self) -> tuple[int, float]:
        return self.engine.last_step_rows, self.engine.last_step_s

    async def join(
        self, tickets: list[object], jobs: list[CaptionJob], priorities: list[float]
    ) -> list[tuple[object, CaptionResult]]:
        return await asyncio.wrap_future(self.thread.submit(self.join_here, tickets, jobs, priorities))

    async def step(self, spread: set) -> list[tuple[object, CaptionResult]]:
        return await asyncio.wrap_future(self.thread.submit(self.step_here, spread))

    def join_here(
        self, tickets: list[object], jobs: list[CaptionJob], priorities: list[float] | None = None
    ) -> list[tuple[object, CaptionResult]]:
        """Take a seat for each job (its image is encoded by the next steps), or answer it: a job
        the model refuses, or one whose pixels fail."""
        answered, joining = [], []
        for ticket, job, priority in zip(tickets, jobs, priorities or [0.0] * len(jobs)):
            try:
                joining.append((ticket, job, self.check(job), priority))
            except JobRejected as exc:
                answered.append((ticket, self.failure(exc)))
        self.join_group(joining, answered)
        return answered

    def join_group(self, joining: list[tuple], answered: list) -> None:
        """Seat `joining` in one encode (in halves where it fails: `in_halves`)."""

        def run(group: list[tuple]) -> None:
            tickets, jobs, prompts, priorities = zip(*group)
            try:
                with torch.inference_mode():
                    pixel_values = self.pixel_values(list(jobs))
                limits = [(job.max_new_tokens, min(self.min_new_tokens, job.max_new_tokens)) for job in jobs]
                self.engine.join(list(tickets), pixel_values, list(prompts), limits, list(priorities), encode_now=False)
            except Exception:
                for ticket in tickets:
                    self.engine.release(ticket)
                raise

        def fail(joined: tuple, exc: Exception) -> None:
            answered.append((joined[0], self.failure(exc)))

        if joining:
            in_halves(joining, run, fail)

    def caption_in_seats(self, jobs: list[CaptionJob]) -> list[CaptionResult]:
        """Greedy jobs through the seats on this thread, as the batcher feeds them when they all
        arrive at once (load_test.ceiling: the model's own rate): as many join as there are free
        seats, then steps until every job is answered. Nobody else waits here, so the images that
        join are encoded whole (no ENCODE_TURN_S)."""
        waiting, answered = list(enumerate(jobs)), {}
        while waiting or self.engine.busy_seats():
            free = self.engine.free_seats()
            joining, waiting = waiting[:free], waiting[free:]
            if joining:
                answered.update(self.join_here(*zip(*joining)))
            answered.update(self.step_here(turn_s=None))
        return [answered[index] for index in range(len(jobs))]

    def step_here(
        self, spread: set | frozenset = frozenset(), turn_s: float | None = ENCODE_TURN_S
    ) -> list[tuple[object, CaptionResult]]:
        """Encode the images waiting for their seats, then one decoder step. The images of tickets
        in `spread` are encoded only for SPREAD_SHARE of a step's time, before each step (a CPU
        spends ~25 steps' time on one image's vision tower): the batcher's choice, so that one
        client's images do not stall other clients' captions."""
        answered, encoding = [], [image.ticket for image in self.engine.encoding]
        # With no caption seated the spread images still go a piece at a time (another client's
        # next image is on its way: the batcher spreads only while another client is active).
        budget_s = SPREAD_SHARE * self.engine.last_step_s if spread else None
        try:
            self.engine.encode(budget_s, spread, turn_s=turn_s)
        except Exception as exc:  # every image being encoded gets the error; seated captions go on
            seated = {seat.ticket for seat in self.engine.seats if seat is not None}
            failed = [ticket for ticket in encoding if ticket not in seated]
            for ticket in failed:
                self.engine.release(ticket)
            answered += [(ticket, self.failure(exc)) for ticket in failed]
        return answered + [(done.ticket, self.finished_result(done)) for done in self.engine.step()]

    def finished_result(self, done: Finished) -> CaptionResult:
        caption = self.processor.tokenizer.decode(done.tokens, skip_special_tokens=True)
        return CaptionResult(caption=caption, new_tokens=len(done.tokens) - done.start, stopped=done.stopped)

    def check(self, job: CaptionJob) -> list[int]:
        """What the API service already checked, checked again here, where a mistake would crash the
        model (JobRejected); returns the decoder's start tokens: [DEC], then the prompt's."""
        if job.jpeg and self.device_jpegs is None:
            raise JobRejected("a JPEG to decode here, but BLIP_GPU_DECODE is off in the model service")
        if not job.jpeg and (job.pixels.shape != self.pixel_shape or job.pixels.dtype != np.uint8):
            raise JobRejected(f"pixels must be {self.pixel_shape} uint8, got {job.pixels.shape} {job.pixels.dtype}")
        start = self.start_tokens(job.prompt or "")
        if len(start) + job.max_new_tokens > self.positions:
            raise JobRejected(
                f"the prompt and max_new_tokens need {len(start) + job.max_new_tokens} positions; "
                f"the model has {self.positions}"
            )
        return start

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one captioner per process; prompts repeat
    def start_tokens(self, prompt: str) -> list[int]:
        ids = self.processor.tokenizer(prompt)["input_ids"] if prompt else []
        return decoder_prompt(ids, self.model.config.text_config.bos_token_id)

    @torch.inference_mode()
    def generate(self, jobs: list[CaptionJob]) -> list[CaptionResult]:
        """Captions for jobs that share prompt and options, in one generate (check: JobRejected)."""
        prompt, max_new_tokens, num_beams = jobs[0].generation_options()
        starts = [self.check(job) for job in jobs]  # generate starts from [DEC] + the prompt's tokens
        start = len(starts[0])
        prompt_inputs = {}
        if prompt:
            tokens = self.processor.tokenizer(prompt, return_tensors="pt")  # once: every job has this prompt
            prompt_inputs = {
                "input_ids": tokens["input_ids"].repeat(len(jobs), 1).to(self.device),
                "attention_mask": tokens["attention_mask"].repeat(len(jobs), 1).to(self.device),
            }
        pixel_values = self.pixel_values(jobs)
        min_new_tokens = min(self.min_new_tokens, max_new_tokens)
        output = self.model.generate(
            pixel_values=pixel_values,
            **prompt_inputs,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens or None,
            num_beams=num_beams,
            do_sample=False,
        )
        return self.results(output, start)

    def pixel_values(self, jobs: list[CaptionJob]) -> torch.Tensor:
        """The batch's normalised pixels on the device, in the model's input dtype: the API's uint8
        arrays, and with BLIP_GPU_DECODE the JPEGs decoded and resized here."""
        on_device = [i for i, job in enumerate(jobs) if job.jpeg]
        if not on_device:
            return self.normalize([job.pixels for job in jobs], self.input_dtype)
        try:
            decoded = self.device_jpegs([jobs[i].jpeg for i in on_device])
        except UndecodableJpeg as exc:
            raise JobRejected(str(exc), status=415) from None
        values = torch.empty((len(jobs), *self.pixel_shape), dtype=torch.float32, device=self.device)
        values[on_device] = self.normalize.lookup(decoded)
        from_api = [i for i, job in enumerate(jobs) if not job.jpeg]
        if from_api:
            values[from_api] = self.normalize([jobs[i].pixels for i in from_api])
        return values.to(self.input_dtype)

    def results(self, output: torch.Tensor, start: int) -> list[CaptionResult]:
        """Each row's caption, how many tokens it generated after the `start` it began from, and
        whether it ended with the end-of-text token (else it ran into max_new_tokens)."""
        captions = self.processor.batch_decode(output, skip_special_tokens=True)
        end = self.model.config.text_config.sep_token_id  # what generate stops at
        results = []
        for caption, row in zip(captions, output[:, start:].tolist()):
            stopped = end in row
            new_tokens = row.index(end) + 1 if stopped else len(row)
            results.append(CaptionResult(caption=caption, new_tokens=new_tokens, stopped=stopped))
        return results
