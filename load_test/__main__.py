"""Load-test /caption servers: a concurrency sweep (closed loop) and fixed arrival rates (open loop).

  # any running server(s)
  python -m load_test run http://127.0.0.1:3000/caption --concurrency 1 4 8 16

  # blip-serve against the per-request baseline, side by side on this machine, same model
  python -m load_test compare --model models/blip-base --tokens 20 --concurrency 1 4 8 16

  # the server around the model: a near-free BLIP (real 384x384 input, tiny layers) on all three
  python -m load_test compare --model micro --concurrency 32 --requests 640

Writes results.json, results.csv and results.png to --out, and prints a table (and ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from blip_serve.shared.settings import load_settings
from load_test.load_generator import StepReport, run_step
from load_test.report import ratios, table, write_all
from tools.sample_images import load_images
from tools.servers import baseline_server, bento_server, litserve_server
from tools.tiny_model import make_blip


def sweep(name: str, url: str, images, args, cpu_seconds=None) -> list[StepReport]:
    """Warm the server up once (a fresh model's first batches run slower), then one step per
    concurrency and per open-loop rate. `cpu_seconds`: the server's CPU meter (ServerProcess)."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.warmup:
        asyncio.run(run_step(name, url, images, "closed", 8, args.warmup, 0, headers))
    steps = []
    for concurrency in args.concurrency:
        total = max(args.requests, concurrency * args.rounds)
        steps.append(
            asyncio.run(
                run_step(
                    name,
                    url,
                    images,
                    "mixed" if args.mixed else "closed",
                    concurrency,
                    total,
                    0,
                    headers,
                    cpu_seconds=cpu_seconds,
                )
            )
        )
        print(table(steps[-1:]).splitlines()[1], file=sys.stderr, flush=True)
    for rate in args.rate:
        steps.append(
            asyncio.run(run_step(name, url, images, "open", rate, args.requests, 0, headers, cpu_seconds=cpu_seconds))
        )
        print(table(steps[-1:]).splitlines()[1], file=sys.stderr, flush=True)
    return steps


def measure_ceiling(args) -> list[dict]:
    """The in-process ceiling (load_test.ceiling) in a child process, so its memory goes with it."""
    out = Path(args.out) / "ceiling.jsonl"
    out.unlink(missing_ok=True)
    extra = dict(args.bento_env)
    command = [
        sys.executable,
        "-m",
        "load_test.ceiling",
        "--model",
        args.model,
        "--tokens",
        str(args.tokens),
        "--batch-size",
        "1",
        extra.get("BLIP_MAX_BATCH_SIZE", str(load_settings({}).max_batch_size)),
        "--json",
        str(out),
    ]
    # OMP_WAIT_POLICY as the model service sets it (service.py): torch's threads sleep between
    # operations, so the CPU an image measured is the model's work, not spinning.
    subprocess.run(command, check=True, env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **extra})
    return [json.loads(line) for line in out.read_text().splitlines()]


def finish(steps: list[StepReport], args, extra: dict | None = None) -> None:
    print(table(steps))
    for c in (extra or {}).get("ceiling", []):
        print(
            f"in-process ceiling: batch {c['batch_size']}, {c['precision']}, {c['threads']} threads: "
            f"{c['images_per_s']} img/s, {c.get('cpu_ms_per_image')} ms of CPU an image"
        )
    for r in (extra or {}).get("model_cpu_outside_model", []):
        print(
            f"blip-serve at concurrency {r['load']:g}: the model process spent {r['ms']} ms of CPU an image "
            "beyond the model's own (in-process, at the largest batch)"
        )
    for r in (extra or {}).get("served_over_ceiling", []):
        print(
            f"blip-serve at concurrency {r['load']:g}: {r['ratio']:.0%} of the in-process rate (mean of before and after)"
        )
    if extra and extra.get("ratios"):
        for r in extra["ratios"]:
            print(
                f"blip-serve / {r['baseline']}, {r['mode']} {r['load']:g}: "
                f"throughput x{r['throughput_ratio']}, p95 x{r['p95_ratio']}"
            )
    for path in write_all(steps, Path(args.out), extra):
        print(f"wrote {path}")


def run(args) -> None:
    images = load_images(args.images, size=args.image_size)
    names = args.name or [f"server{i + 1}" for i in range(len(args.urls))]
    steps = [step for name, url in zip(names, args.urls) for step in sweep(name, url, images, args)]
    finish(steps, args)


def compare(args) -> None:
    """Start each server in turn on this machine (never both at once), sweep it, stop it."""
    images = load_images(args.images, size=args.image_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model == "micro":  # made here: BLIP's real input size, layers that cost almost nothing
        args.model = str(out / "micro-model")
        if not Path(args.model, "config.json").exists():
            make_blip(args.model, "micro")
    env = {"BLIP_MODEL": args.model, "BLIP_MAX_NEW_TOKENS": str(args.tokens), "BLIP_MIN_NEW_TOKENS": str(args.tokens)}
    ceiling = measure_ceiling(args) if args.ceiling else []
    steps = []
    litserve_env = {**env, **{k: v for k, v in args.bento_env if k == "BLIP_MAX_BATCH_SIZE"}}
    servers = {
        "blip-serve": lambda: bento_server({**env, **dict(args.bento_env)}, out / "blip-serve.log"),
        "baseline": lambda: baseline_server(env, out / "baseline.log", workers=args.baseline_workers),
        "litserve": lambda: litserve_server(litserve_env, out / "litserve.log"),
        "litserve-bf16": lambda: litserve_server(
            {**litserve_env, "BLIP_BENCH_AUTOCAST": "bf16"}, out / "litserve-bf16.log"
        ),
    }
    for name in args.servers:
        print(f"starting {name} ...", file=sys.stderr, flush=True)
        with servers[name]() as server:
            steps += sweep(name, f"{server.url}/caption", images, args, server.cpu_seconds)
        if name == "blip-serve" and args.ceiling:  # again: a shared machine's speed drifts within minutes
            ceiling += measure_ceiling(args)
        write_all(steps, out, {"ceiling": ceiling})  # so far: a run cut short keeps what it measured
    extra = {"settings": {k: v for k, v in vars(args).items() if k != "func"}}
    extra["ratios"] = [
        {"baseline": other, **r}
        for other in ("baseline", "litserve", "litserve-bf16")
        if {"blip-serve", other} <= set(args.servers)
        for r in ratios(steps, "blip-serve", other)
    ]
    if ceiling:
        # The best batch size's rate, averaged over the measurements before and after blip-serve's sweep.
        best_batch = max(ceiling, key=lambda c: c["images_per_s"])["batch_size"]
        rates = [c["images_per_s"] for c in ceiling if c["batch_size"] == best_batch]
        best = sum(rates) / len(rates)
        extra["ceiling"] = [{k: v for k, v in c.items() if k != "captions"} for c in ceiling]
        extra["served_over_ceiling"] = [
            {"load": s.load, "ratio": round(s.throughput / best, 2)}
            for s in steps
            if s.server == "blip-serve" and s.mode == "closed"
        ]
        # What the model process spends around the model (HTTP, the channel, the batcher): its CPU
        # per image served less the model's own CPU per image in-process, at the seats' batch size.
        largest = max(c["batch_size"] for c in ceiling)
        model_cpu = [c["cpu_ms_per_image"] for c in ceiling if c["batch_size"] == largest and "cpu_ms_per_image" in c]
        if model_cpu:
            extra["model_cpu_outside_model"] = [
                {"load": s.load, "ms": round(s.model_cpu_ms_per_image - sum(model_cpu) / len(model_cpu), 2)}
                for s in steps
                if s.server == "blip-serve" and s.mode == "closed" and s.model_cpu_ms_per_image is not None
            ]
    finish(steps, args, extra)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m load_test", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--concurrency", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32], help="closed-loop clients, one step each"
    )
    common.add_argument(
        "--rate", type=float, nargs="*", default=[], help="open-loop arrival rates (req/s), one step each"
    )
    common.add_argument(
        "--requests", type=int, default=32, help="requests per step (closed loop: at least 2 per client)"
    )
    common.add_argument("--rounds", type=int, default=2, help="closed loop: each client sends at least this many")
    common.add_argument(
        "--warmup", type=int, default=40, help="requests sent (8 at a time) and discarded before a server's first step"
    )
    common.add_argument("--images", help="folder of images to send (default: generated JPEGs, see --image-size)")
    common.add_argument(
        "--image-size",
        default=(640, 480),
        type=lambda text: tuple(int(v) for v in text.split("x")),
        help="generated JPEGs' size, e.g. 1920x1080 or 4032x3024 (a 12 MP phone photo)",
    )
    common.add_argument("--api-key", help="sent as Authorization: Bearer <key>")
    common.add_argument(
        "--mixed",
        action="store_true",
        help="closed loop: each client its own max_new_tokens (12-26) and prompt (load_generator.mixed_fields)",
    )
    common.add_argument("--out", default="results", help="folder for results.json/.csv/.png")
    commands = parser.add_subparsers(required=True)

    run_parser = commands.add_parser("run", parents=[common], help="load-test running servers")
    run_parser.add_argument("urls", nargs="+", help="…/caption URLs")
    run_parser.add_argument("--name", nargs="*", help="a name per URL, for the table and plot")
    run_parser.set_defaults(func=run)

    compare_parser = commands.add_parser(
        "compare", parents=[common], help="blip-serve vs the per-request baseline and LitServe"
    )
    compare_parser.add_argument(
        "--model",
        required=True,
        help="model directory the servers load; 'micro': a near-free BLIP made in --out, to measure the servers",
    )
    compare_parser.add_argument("--tokens", type=int, default=20, help="tokens generated per caption, forced on both")
    compare_parser.add_argument(
        "--servers",
        nargs="+",
        default=["blip-serve", "baseline"],
        choices=["blip-serve", "baseline", "litserve", "litserve-bf16"],
        help="baseline: per-request FastAPI + gunicorn; litserve: BLIP on LitServe with its batching, fp32 as "
        "its documentation writes it; litserve-bf16: the same under torch.autocast bf16 (what a user on an "
        "AMX CPU writes)",
    )
    compare_parser.add_argument("--baseline-workers", type=int, default=2)
    compare_parser.add_argument(
        "--bento-env",
        nargs="*",
        default=[],
        type=lambda text: tuple(text.split("=", 1)),
        metavar="BLIP_X=VALUE",
        help="extra settings for blip-serve",
    )
    compare_parser.add_argument(
        "--ceiling", action="store_true", help="first measure the in-process ceiling (load_test.ceiling)"
    )
    compare_parser.set_defaults(func=compare)

    args = parser.parse_args(argv)
    # `timeout` and Ctrl-C: exit through the `with` blocks, so the servers started are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.func(args)


if __name__ == "__main__":
    main()
