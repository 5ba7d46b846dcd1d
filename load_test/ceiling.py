"""In-process ceiling: how many images per second BlipCaptioner itself does, no HTTP, and with
`--stages` where that time goes against what the hardware allows.

    python -m load_test.ceiling --model models/blip-base --batch-size 8 --tokens 20 --stages

Uses exactly the model service's code (blip_serve.model.BlipCaptioner), so served throughput can be
read as a fraction of it. The stages, each timed on the same batch through the same code:

- vision: the vision tower on the batch's pixels; FLOPs counted from the config (~111 GFLOP an
  image for the base architecture).
- prefill: a one-token caption less the vision tower: the normalisation, the prompt through the
  decoder, and every layer's cross-attention keys and values over the image's 577 tokens (~16 GFLOP
  an image), then one token.
- decoder step: (a `--tokens` caption - a one-token caption) / (tokens - 1). A step reads every
  decoder weight once for the whole batch and each row's cross-attention keys and values: its
  bytes/s are read against the copy loop's bandwidth, its FLOP/s against the peak.
- caption: the whole `--tokens` caption, the throughput figure.

Peaks and bandwidth: load_test/hardware.py (how each is derived).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import time

import torch

from blip_serve.decoding.images import ImageLimits, ResizeSpec, prepare_image
from blip_serve.decoding.pool import NO_PIXELS
from blip_serve.model.captioner import BlipCaptioner
from blip_serve.shared.jobs import CaptionJob
from blip_serve.shared.settings import load_settings
from load_test import hardware
from tools.sample_images import sample_images


def make_jobs(model_dir: str, count: int, tokens: int, jpegs: bool = False) -> list[CaptionJob]:
    """640x480 JPEGs as the API service sends them: resized pixels, or with `jpegs`
    (BLIP_GPU_DECODE) the files themselves, so that the ceiling includes the device's decode."""
    spec = ResizeSpec.from_model_dir(model_dir)
    if jpegs:
        return [CaptionJob(pixels=NO_PIXELS, jpeg=data, max_new_tokens=tokens) for _, data in sample_images(count)]
    return [
        CaptionJob(pixels=prepare_image(data, ImageLimits(), spec).pixels, max_new_tokens=tokens)
        for _, data in sample_images(count)
    ]


def caption(captioner: BlipCaptioner, jobs: list[CaptionJob]) -> list:
    """The path the server takes: greedy jobs through the step-level decoder's seats."""
    if all(captioner.fits(job) for job in jobs):
        return captioner.caption_in_seats(jobs)
    return captioner.caption_jobs(jobs)


def measure(
    captioner: BlipCaptioner, jobs: list[CaptionJob], batch_size: int, repeats: int
) -> tuple[float, float, list[str]]:
    """Images per second over `repeats` batches (after one warm-up batch), the process's CPU
    milliseconds an image (every thread: what the model costs the model process, the server's
    figure to compare with), and the captions."""
    batch = jobs[:batch_size]
    caption(captioner, batch)  # warm-up: first-call allocations and kernel selection
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        results = caption(captioner, batch)
    images = batch_size * repeats
    cpu_ms = (time.process_time() - cpu_started) * 1000 / images
    return images / (time.perf_counter() - started), cpu_ms, [r.caption for r in results]


def vision_flops(config) -> float:
    """FLOPs of the vision tower for one image (multiply-adds x 2; layer norms and softmax left out)."""
    d, mlp, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    patches = (config.image_size // config.patch_size) ** 2
    tokens = patches + 1
    per_layer = 2 * tokens * d * 3 * d + 2 * 2 * tokens * tokens * d + 2 * tokens * d * d + 2 * 2 * tokens * d * mlp
    return 2 * patches * 3 * config.patch_size**2 * d + layers * per_layer


def image_tokens(config) -> int:
    return (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1


def prefill_flops(config) -> float:
    """FLOPs before the first token, per image: each decoder layer's cross-attention keys and values
    over the image's tokens (the one-token prompt's own work is a step's, counted there)."""
    text = config.text_config
    return text.num_hidden_layers * 2 * 2 * image_tokens(config) * config.vision_config.hidden_size * text.hidden_size


def step_flops(config, position: int) -> float:
    """FLOPs of one decoder step for one row at `position` (the LM head's transform and the head
    itself included). This and the two above equal torch's FlopCounterMode on a small BLIP."""
    text = config.text_config
    d, mlp = text.hidden_size, text.intermediate_size
    attention = 2 * 2 * d * (position + image_tokens(config))  # scores and context, self and cross
    per_layer = 2 * 4 * d * d + 2 * 2 * d * d + attention + 2 * 2 * d * mlp  # self q,k,v,o; cross q,o
    return text.num_hidden_layers * per_layer + 2 * d * d + 2 * d * text.vocab_size


def step_bytes(captioner: BlipCaptioner, rows: int) -> float:
    """Bytes one decoder step reads: every decoder weight once, and each row's cross-attention
    keys and values (the self-attention cache is small beside them)."""
    decoder = captioner.model.text_decoder
    weights = sum(p.numel() * p.element_size() for p in decoder.parameters())
    text = captioner.model.config.text_config
    image_dtype = captioner.engine.image_dtype if captioner.engine else next(decoder.parameters()).dtype
    element = image_dtype.itemsize  # `hybrid`: bf16 (engine.SeatEngine)
    cross = text.num_hidden_layers * 2 * image_tokens(captioner.model.config) * text.hidden_size * element
    return weights + rows * cross


def best_time(run, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def stages(captioner: BlipCaptioner, jobs: list[CaptionJob], batch_size: int, tokens: int) -> dict:
    """Seconds per batch of each stage, what it achieves, and the share of the peaks that is."""
    batch = jobs[:batch_size]
    one_token = [job.model_copy(update={"max_new_tokens": 1}) for job in batch]
    config = captioner.model.config
    names = {dtype: name for name, dtype in hardware.DTYPES.items()}
    vision_dtype = names[captioner.input_dtype]
    decoder_dtype = names[next(captioner.model.text_decoder.parameters()).dtype]
    limits = {dtype: hardware.describe(captioner.device, dtype) for dtype in {vision_dtype, decoder_dtype}}

    pixels = captioner.pixel_values(batch)

    @torch.inference_mode()
    def vision():
        captioner.model.vision_model(pixel_values=pixels)
        hardware.synchronize(captioner.device)

    caption(captioner, batch)  # warm-up
    vision_s = best_time(vision)
    one_s = best_time(lambda: caption(captioner, one_token))
    whole_s = best_time(lambda: caption(captioner, batch))
    prefill_s = max(one_s - vision_s, 1e-9)
    step_s = max((whole_s - one_s) / max(tokens - 1, 1), 1e-9)
    middle = tokens // 2 + 1

    def rate(flops: float, seconds: float, dtype: str) -> dict:
        achieved = flops / seconds
        peak, gemm = limits[dtype]["isa_peak_flops"], limits[dtype]["gemm_flops"]
        return {
            "gflop_per_s": round(achieved / 1e9, 1),
            "of_isa_peak": round(achieved / peak, 3) if peak else None,
            "of_gemm_peak": round(achieved / gemm, 3),
        }

    step_read = step_bytes(captioner, batch_size)
    return {
        "hardware": {
            dtype: {
                "device": limit["device"],
                "isa_peak_gflop_per_s": round(limit["isa_peak_flops"] / 1e9, 1) if limit["isa_peak_flops"] else None,
                "isa_peak_how": limit["isa_peak_how"],
                "gemm_gflop_per_s": round(limit["gemm_flops"] / 1e9, 1),
                "copy_gb_per_s": round(limit["copy_bandwidth"] / 1e9, 1),
            }
            for dtype, limit in limits.items()
        },
        "vision": {
            "s": round(vision_s, 3),
            **rate(vision_flops(config.vision_config) * batch_size, vision_s, vision_dtype),
        },
        "prefill": {
            "s": round(prefill_s, 3),
            **rate(prefill_flops(config) * batch_size, prefill_s, decoder_dtype),
        },
        "decoder_step": {
            "s": round(step_s, 4),
            **rate(step_flops(config, middle) * batch_size, step_s, decoder_dtype),
            "gb_per_s": round(step_read / step_s / 1e9, 1),
            "of_copy_bandwidth": round(step_read / step_s / limits[decoder_dtype]["copy_bandwidth"], 3),
        },
        "caption": {"s": round(whole_s, 3), "images_per_s": round(batch_size / whole_s, 3)},
    }


@functools.cache
def plain_blip(model_dir: str) -> tuple:
    """transformers' BLIP and its processor, loaded once for every batch size and variant."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    return BlipProcessor.from_pretrained(model_dir), BlipForConditionalGeneration.from_pretrained(model_dir).eval()


def plain_transformers(model_dir: str, batch_size: int, tokens: int, autocast: bool, repeats: int) -> float:
    """Images per second of BLIP as a user writes it: transformers' processor (not timed) and
    `generate` with its default attention, fp32, or under `torch.autocast("cpu", torch.bfloat16)`."""
    from PIL import Image

    processor, model = plain_blip(model_dir)
    images = [Image.open(io.BytesIO(data)).convert("RGB") for _, data in sample_images(batch_size)]
    pixels = processor(images=images, return_tensors="pt").pixel_values
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def run():
        with torch.inference_mode(), context:
            model.generate(pixel_values=pixels, max_new_tokens=tokens, min_new_tokens=tokens)

    run()  # warm-up
    return batch_size / best_time(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--precision", help="default: BLIP_PRECISION, as the server reads it")
    parser.add_argument("--attention", help="default: BLIP_ATTENTION")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the server's default)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=20, help="generated tokens per image (forced)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--versus",
        nargs="*",
        default=[],
        choices=["plain-fp32", "plain-autocast-bf16"],
        help="also time plain transformers at the same batch sizes, in the same run",
    )
    parser.add_argument("--stages", action="store_true", help="also time each stage against the hardware's peaks")
    parser.add_argument("--json", help="append the results to this JSON-lines file")
    args = parser.parse_args()

    settings = load_settings()
    settings = settings.model_copy(
        update={
            "model": args.model,
            "precision": args.precision or settings.precision,
            "attention": args.attention or settings.attention,
            "torch_threads": args.threads,
            "min_new_tokens": args.tokens,
            "max_batch_size": max(args.batch_size),  # the decoder's seats: every batch size is seated at once
        }
    )
    started = time.perf_counter()
    captioner = BlipCaptioner(args.model, settings)
    ready_s = time.perf_counter() - started  # loading, and with BLIP_COMPILE compiling: start-to-ready's share
    jobs = make_jobs(args.model, max(args.batch_size), args.tokens, jpegs=settings.gpu_decode)
    for batch_size in args.batch_size:
        rate, cpu_ms, captions = measure(captioner, jobs, batch_size, args.repeats)
        result = {
            "precision": captioner.precision,
            "attention": settings.attention,
            "compiled": captioner.describe()["compiled_parts"],
            "ready_s": round(ready_s, 1),
            "jpeg_decoder": captioner.describe()["jpeg_decoder"],
            "threads": captioner.threads,
            "batch_size": batch_size,
            "tokens": args.tokens,
            "images_per_s": round(rate, 3),
            "cpu_ms_per_image": round(cpu_ms, 2),
            "captions": captions,
        }
        if args.stages:
            result["stages"] = stages(captioner, jobs, batch_size, args.tokens)
        for plain in args.versus:
            plain_rate = plain_transformers(args.model, batch_size, args.tokens, plain.endswith("bf16"), args.repeats)
            result[plain] = {"images_per_s": round(plain_rate, 3), "ratio": round(rate / plain_rate, 2)}
        print(json.dumps({k: v for k, v in result.items() if k != "captions"}, indent=1), flush=True)
        if args.json:
            with open(args.json, "a") as out:
                out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
