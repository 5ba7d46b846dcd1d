"""In-process ceiling: how many images per second BlipCaptioner itself does, no HTTP.

    python -m load_test.ceiling --model models/blip-base --precision hybrid --batch-size 8 --tokens 20

Uses exactly the model service's code (blip_serve.model.BlipCaptioner), so served throughput can be
read as a fraction of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from blip_serve.images import decode_image
from blip_serve.model import BlipCaptioner, CaptionJob, load_image_processor, preprocess
from blip_serve.settings import Settings
from load_test.sample_images import sample_images


def make_jobs(model_dir: str, count: int, tokens: int) -> list[CaptionJob]:
    image_processor = load_image_processor(model_dir)
    jobs = []
    for _, data in sample_images(count):
        pixels = preprocess(image_processor, decode_image(data, 10**8))
        jobs.append(CaptionJob(pixel_values=pixels, max_new_tokens=tokens))
    return jobs


def measure(captioner: BlipCaptioner, jobs: list[CaptionJob], batch_size: int, repeats: int) -> tuple[float, list[str]]:
    """Images per second over `repeats` batches (after one warm-up batch), and the captions."""
    batch = jobs[:batch_size]
    captioner.caption(batch)  # warm-up: first-call allocations and kernel selection
    started = time.perf_counter()
    for _ in range(repeats):
        captions = captioner.caption(batch)
    return batch_size * repeats / (time.perf_counter() - started), captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the server's default)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=20, help="generated tokens per image (forced)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="append the results to this JSON-lines file")
    args = parser.parse_args()

    settings = dataclasses.replace(
        Settings.from_env(), model=args.model, precision=args.precision, attention=args.attention,
        torch_threads=args.threads, min_new_tokens=args.tokens,
    )
    captioner = BlipCaptioner(args.model, settings)
    jobs = make_jobs(args.model, max(args.batch_size), args.tokens)
    for batch_size in args.batch_size:
        rate, captions = measure(captioner, jobs, batch_size, args.repeats)
        result = {
            "precision": captioner.precision, "attention": args.attention, "threads": captioner.threads,
            "batch_size": batch_size, "tokens": args.tokens, "images_per_s": round(rate, 3), "captions": captions,
        }
        print(json.dumps({k: v for k, v in result.items() if k != "captions"}), flush=True)
        if args.json:
            with open(args.json, "a") as out:
                out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
