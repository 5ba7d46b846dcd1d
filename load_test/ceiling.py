"""In-process ceiling: how many images per second BlipCaptioner itself does, no HTTP.

    python -m load_test.ceiling --model models/blip-base --precision hybrid --batch-size 8 --tokens 20

Uses exactly the model service's code (blip_serve.model.BlipCaptioner), so served throughput can be
read as a fraction of it.
"""

from __future__ import annotations

import argparse
import json
import time

from blip_serve.decoding.images import ImageLimits, ResizeSpec, prepare_image
from blip_serve.decoding.pool import NO_PIXELS
from blip_serve.model.captioner import BlipCaptioner
from blip_serve.shared.jobs import CaptionJob
from blip_serve.shared.settings import load_settings
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


def measure(captioner: BlipCaptioner, jobs: list[CaptionJob], batch_size: int, repeats: int) -> tuple[float, list[str]]:
    """Images per second over `repeats` batches (after one warm-up batch), and the captions."""
    batch = jobs[:batch_size]
    captioner.caption_jobs(batch)  # warm-up: first-call allocations and kernel selection
    started = time.perf_counter()
    for _ in range(repeats):
        results = captioner.caption_jobs(batch)
    return batch_size * repeats / (time.perf_counter() - started), [r.caption for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--precision", help="default: BLIP_PRECISION, as the server reads it")
    parser.add_argument("--attention", help="default: BLIP_ATTENTION")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the server's default)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=20, help="generated tokens per image (forced)")
    parser.add_argument("--repeats", type=int, default=2)
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
        }
    )
    captioner = BlipCaptioner(args.model, settings)
    jobs = make_jobs(args.model, max(args.batch_size), args.tokens, jpegs=settings.gpu_decode)
    for batch_size in args.batch_size:
        rate, captions = measure(captioner, jobs, batch_size, args.repeats)
        result = {
            "precision": captioner.precision,
            "attention": settings.attention,
            "compiled": captioner.compiled is not None,
            "jpeg_decoder": captioner.describe()["jpeg_decoder"],
            "threads": captioner.threads,
            "batch_size": batch_size,
            "tokens": args.tokens,
            "images_per_s": round(rate, 3),
            "captions": captions,
        }
        print(json.dumps({k: v for k, v in result.items() if k != "captions"}), flush=True)
        if args.json:
            with open(args.json, "a") as out:
                out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
