"""Load-test /caption servers: a concurrency sweep (closed loop) and fixed arrival rates (open loop).

  # any running server(s)
  python -m load_test run http://127.0.0.1:3000/caption --concurrency 1 4 8 16

  # blip-serve against the per-request baseline, side by side on this machine, same model
  python -m load_test compare --model models/blip-base --tokens 20 --concurrency 1 4 8 16

Writes results.json, results.csv and results.png to --out, and prints a table (and ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from .client import StepReport, run_step
from .report import ratios, table, write_all
from .sample_images import load_images
from .servers import BaselineServer, BentoServer


def sweep(name: str, url: str, images, args) -> list[StepReport]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    steps = []
    for concurrency in args.concurrency:
        total = max(args.requests, concurrency * args.rounds)
        step = asyncio.run(run_step(name, url, images, "closed", concurrency, total, args.warmup, headers))
        print(table([step]).splitlines()[1], file=sys.stderr, flush=True)
        steps.append(step)
    for rate in args.rate:
        step = asyncio.run(run_step(name, url, images, "open", rate, args.requests, args.warmup, headers))
        print(table([step]).splitlines()[1], file=sys.stderr, flush=True)
        steps.append(step)
    return steps


def finish(steps: list[StepReport], args, extra: dict | None = None) -> None:
    print(table(steps))
    if extra and extra.get("ratios"):
        print("\nblip-serve / baseline:")
        for r in extra["ratios"]:
            print(f"  {r['mode']} {r['load']:g}: throughput x{r['throughput_ratio']}, p95 x{r['p95_ratio']}")
    for path in write_all(steps, Path(args.out), extra):
        print(f"wrote {path}")


def run(args) -> None:
    images = load_images(args.images)
    names = args.name or [f"server{i + 1}" for i in range(len(args.urls))]
    steps = [step for name, url in zip(names, args.urls) for step in sweep(name, url, images, args)]
    finish(steps, args)


def compare(args) -> None:
    """Start each server in turn on this machine (never both at once), sweep it, stop it."""
    images = load_images(args.images)
    env = {"BLIP_MODEL": args.model, "BLIP_MAX_NEW_TOKENS": str(args.tokens), "BLIP_MIN_NEW_TOKENS": str(args.tokens)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = []
    servers = {
        "blip-serve": lambda: BentoServer({**env, **dict(kv.split("=", 1) for kv in args.bento_env)}, out / "blip-serve.log"),
        "baseline": lambda: BaselineServer(env, out / "baseline.log", workers=args.baseline_workers),
    }
    for name in args.servers:
        print(f"starting {name} ...", file=sys.stderr, flush=True)
        with servers[name]() as server:
            steps += sweep(name, f"{server.url}/caption", images, args)
    extra = {"settings": {k: v for k, v in vars(args).items() if k != "func"}}
    if {"blip-serve", "baseline"} <= set(args.servers):
        extra["ratios"] = ratios(steps, "blip-serve", "baseline")
    finish(steps, args, extra)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m load_test", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32], help="closed-loop clients, one step each")
    common.add_argument("--rate", type=float, nargs="*", default=[], help="open-loop arrival rates (req/s), one step each")
    common.add_argument("--requests", type=int, default=32, help="requests per step (closed loop: at least 2 per client)")
    common.add_argument("--rounds", type=int, default=2, help="closed loop: each client sends at least this many")
    common.add_argument("--warmup", type=int, default=4, help="requests sent and discarded before each step")
    common.add_argument("--images", help="folder of images to send (default: generated 640x480 JPEGs)")
    common.add_argument("--api-key", help="sent as Authorization: Bearer <key>")
    common.add_argument("--out", default="results", help="folder for results.json/.csv/.png")
    commands = parser.add_subparsers(required=True)

    run_parser = commands.add_parser("run", parents=[common], help="load-test running servers")
    run_parser.add_argument("urls", nargs="+", help="…/caption URLs")
    run_parser.add_argument("--name", nargs="*", help="a name per URL, for the table and plot")
    run_parser.set_defaults(func=run)

    compare_parser = commands.add_parser("compare", parents=[common], help="blip-serve vs the per-request baseline")
    compare_parser.add_argument("--model", required=True, help="model directory both servers load")
    compare_parser.add_argument("--tokens", type=int, default=20, help="tokens generated per caption, forced on both")
    compare_parser.add_argument("--servers", nargs="+", default=["blip-serve", "baseline"], choices=["blip-serve", "baseline"])
    compare_parser.add_argument("--baseline-workers", type=int, default=2)
    compare_parser.add_argument("--bento-env", nargs="*", default=[], metavar="BLIP_X=VALUE", help="extra settings for blip-serve")
    compare_parser.set_defaults(func=compare)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
