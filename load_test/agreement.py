"""How far each precision (and BLIP_COMPILE) agrees with the exact path: the share of captions, and
of tokens, equal to fp32 eager's for the same images, through BlipCaptioner as the server runs it.

    python -m load_test.agreement --model models/blip-base --images 100 --variants hybrid bf16 fp32+compile

A variant is a precision, `+compile` to compile it. Images: 640x480 photo-like JPEGs, resized as
the API service does. Captions are greedy, `--tokens` long at most (not forced: where a caption
ends is part of what may differ).
"""

from __future__ import annotations

import argparse
import json
import time

from blip_serve.model.captioner import BlipCaptioner
from blip_serve.shared.settings import load_settings
from load_test.ceiling import make_jobs


def captions(model: str, variant: str, jobs, batch_size: int) -> tuple[list[str], float]:
    precision, _, compiled = variant.partition("+")
    settings = load_settings().model_copy(
        update={"model": model, "precision": precision, "compile": "on" if compiled else "off", "min_new_tokens": 0}
    )
    captioner = BlipCaptioner(model, settings)
    started = time.perf_counter()
    out = []
    for start in range(0, len(jobs), batch_size):
        for result in captioner.caption_jobs(jobs[start : start + batch_size]):
            if result.caption is None:
                raise SystemExit(f"{precision}: image {len(out)} got {result.status}: {result.error}")
            out.append(result.caption)
    return out, time.perf_counter() - started


def token_agreement(left: str, right: str) -> tuple[int, int]:
    """Leading words that agree, and the longer caption's words."""
    a, b = left.split(), right.split()
    if a == b:  # an empty caption equal to an empty caption agrees in full
        return max(len(a), 1), max(len(a), 1)
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same, max(len(a), len(b), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=20, help="max_new_tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=["hybrid", "bf16"])
    parser.add_argument("--json", help="append the results to this JSON-lines file")
    args = parser.parse_args()

    jobs = make_jobs(args.model, args.images, args.tokens)
    reference, reference_s = captions(args.model, "fp32", jobs, args.batch_size)
    for variant in args.variants:
        got, seconds = captions(args.model, variant, jobs, args.batch_size)
        words = [token_agreement(a, b) for a, b in zip(reference, got)]
        result = {
            "model": args.model,
            "variant": variant,
            "images": len(jobs),
            "same_captions": sum(a == b for a, b in zip(reference, got)),
            "same_leading_words": round(sum(s for s, _ in words) / sum(n for _, n in words), 3),
            "seconds": round(seconds, 1),
            "fp32_seconds": round(reference_s, 1),
        }
        print(json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "a") as out:
                out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
