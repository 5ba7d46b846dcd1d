"""blip-caption: caption files and folders with a blip-serve server, resumably.

    blip-caption photos/ --url http://127.0.0.1:3000 --out captions.jsonl --resume
    python -m blip_serve.client photos/ --sidecar --batch 8 --concurrency 4

Needs httpx alone (tqdm draws a progress bar where it is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import os
import shlex
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from blip_serve.client.library import TIMEOUT_S, AsyncBlipClient, BadAnswer, BlipError, Outcome, chunks
from blip_serve.formats import IMAGE_SUFFIXES


def find_images(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """Images under `paths` (folders walked recursively), sorted; and the files skipped, less the
    sidecars of those images (an earlier --sidecar run wrote them: nothing to say about them)."""
    images, skipped = [], []
    for path in paths:
        candidates = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for candidate in candidates:
            (images if candidate.suffix.lower() in IMAGE_SUFFIXES else skipped).append(candidate)
    sidecars = {sidecar(image) for image in images}
    return images, [path for path in skipped if path not in sidecars]


CSV_COLUMNS = ["path", "caption", "error", "status"]
PERMANENT = range(400, 500)  # the server refused the image itself: trying again gives the same answer
TRANSIENT = {408, 429}


def settled_record(row: dict) -> bool:
    """A result record that a --resume keeps: a caption (the empty caption is one), or a refusal for good."""
    if row.get("caption") is not None and not row.get("error"):
        return True
    try:
        status = int(row.get("status") or 0)
    except ValueError:
        return False
    return status in PERMANENT and status not in TRANSIENT


class ResultFile:
    """--out: JSON Lines (one object per image) or, for a .csv name, CSV rows; appended one whole
    record at a time and flushed, so a killed run leaves every finished image and no torn record."""

    def __init__(self, path: Path):
        self.path = path
        self.csv = path.suffix.lower() == ".csv"

    def already_done(self) -> set[str]:
        """Paths the file settles: captioned, or refused for good (a 4xx other than 408/429). A torn
        last record (a killed run) is cut off, and so are the records of transient failures (5xx,
        no answer), which this run tries again: the file keeps one record per image."""
        if not self.path.exists():
            return set()
        text = original = self.path.read_text()
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        if self.csv:
            rows = list(csv.DictReader(io.StringIO(text)))
        else:
            rows = [json.loads(line) for line in text.splitlines()]
        settled = [row for row in rows if settled_record(row)]
        if len(settled) != len(rows) or text != original:
            self.rewrite(settled)
        return {row["path"] for row in settled}

    def rewrite(self, rows: list[dict]) -> None:
        partial = self.path.with_name(f".{self.path.name}.partial")
        with open(partial, "w", newline="") as sink:
            if self.csv:
                writer = csv.DictWriter(sink, CSV_COLUMNS, lineterminator="\n")
                writer.writeheader()
                writer.writerows({column: row.get(column, "") for column in CSV_COLUMNS} for row in rows)
            else:
                sink.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(partial, self.path)

    def __enter__(self) -> ResultFile:
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.sink = open(self.path, "a", newline="")  # noqa: SIM115  (closed by __exit__)
        if self.csv:
            self.writer = csv.DictWriter(self.sink, CSV_COLUMNS, lineterminator="\n")
            if new:
                self.writer.writeheader()
        return self

    def write(self, record: dict) -> None:
        if self.csv:
            self.writer.writerow({column: record.get(column, "") for column in CSV_COLUMNS})
        else:
            self.sink.write(json.dumps(record) + "\n")
        self.sink.flush()

    def __exit__(self, *exc) -> None:
        self.sink.close()


def sidecar(image: Path) -> Path:
    return image.with_suffix(".txt")


def write_sidecar(image: Path, caption: str) -> None:
    """image.jpg -> image.txt, written to a temporary file and renamed: never half a caption."""
    target = sidecar(image)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(caption + "\n")
    os.replace(partial, target)


class Stop(Exception):
    """The run cannot succeed (no server there, a wrong key, a wrong URL): say why, write nothing more."""


def plan_sidecars(images: list[Path], resume: bool, overwrite: bool) -> tuple[list[Path], list[Path]]:
    """(images to caption, images whose sidecar is already there). Refuses, before any request, two
    images that would write one sidecar, and sidecars it would overwrite without --overwrite."""
    by_target: dict[Path, list[Path]] = {}
    for image in images:
        by_target.setdefault(sidecar(image), []).append(image)
    clashes = [group for group in by_target.values() if len(group) > 1]
    if clashes:
        shown = "; ".join(" and ".join(str(p) for p in group) for group in clashes[:3])
        raise Stop(f"{len(clashes)} sidecar name(s) would be written twice ({shown}): rename one of each")
    existing = [image for image in images if sidecar(image).exists()]
    if existing and not (resume or overwrite):
        raise Stop(
            f"{len(existing)} sidecar file(s) exist already, e.g. {sidecar(existing[0])}: "
            "--resume skips their images, --overwrite replaces them"
        )
    if overwrite:
        return images, []
    return [image for image in images if not sidecar(image).exists()], existing


async def check_server(client: AsyncBlipClient, url: str) -> None:
    """Before the first batch: is a blip-serve server there at all? (Retrying a wrong URL for
    minutes, then blaming every image, helps nobody.)"""
    try:
        status, _, _ = await client.fetch("GET", "/readyz", timeout_s=10)
    except httpx.TransportError as exc:
        raise Stop(f"cannot reach {url}: {describe_transport_error(exc)}") from None
    except BadAnswer as exc:
        raise Stop(f"{url} does not look like a blip-serve server: {exc}") from None
    if status not in (200, 503):
        raise Stop(f"{url} does not look like a blip-serve server: GET /readyz answered {status}")


def describe_transport_error(exc: BaseException) -> str:
    causes = []
    while exc is not None and len(causes) < 10:
        causes.append(exc)
        exc = exc.__cause__ or exc.__context__
    if any(isinstance(cause, ConnectionRefusedError) for cause in causes):
        return "connection refused (is the server running, on this port?)"
    if any(isinstance(cause, socket.gaierror) for cause in causes):
        return "no such host"
    return str(causes[0]) or type(causes[0]).__name__


FATAL = {401: "the server wants an API key: --api-key KEY or BLIP_API_KEY", 403: "the API key was refused"}


async def caption_folder(args: argparse.Namespace, counts: Counter) -> int:
    images, skipped = find_images(args.paths)
    if not args.quiet:
        for path in skipped:
            print(f"skipped (not an image): {path}", file=sys.stderr)
    out = ResultFile(Path(args.out)) if args.out else None
    done = out.already_done() if out and args.resume else set()
    todo = [image for image in images if str(image) not in done]
    if args.sidecar:
        todo, kept = plan_sidecars(todo, args.resume, args.overwrite)
        done |= {str(image) for image in kept}
    progress = Progress(0, quiet=True)
    started = time.monotonic()
    try:
        with out or contextlib.nullcontext() as sink:
            async with AsyncBlipClient(
                args.url, api_key=args.api_key, retries=args.retries, timeout_s=args.timeout
            ) as client:
                if todo:
                    await check_server(client, args.url)
                progress = Progress(len(todo), args.quiet)
                slots = asyncio.Semaphore(args.concurrency)

                async def run(group: list[Path]) -> None:
                    async with slots:
                        try:
                            outcomes = await client.caption_batch(group, prompt=args.prompt)
                        except BlipError as exc:  # the whole request failed: every image of it did
                            if exc.status in FATAL or exc.status == 404:
                                raise Stop(FATAL.get(exc.status, f"{args.url}/captions: {exc.message}")) from None
                            outcomes = [Outcome(str(p), error=exc.message, status=exc.status) for p in group]
                    for outcome in outcomes:
                        record = {"path": outcome.image}
                        if outcome.caption is not None:
                            record["caption"] = outcome.caption
                            counts["captioned"] += 1
                            if args.sidecar:
                                write_sidecar(Path(outcome.image), outcome.caption)
                        else:
                            record.update(error=outcome.error, status=outcome.status)
                            counts[f"failed ({outcome.status})"] += 1
                            if not args.quiet:
                                progress.write(f"failed: {outcome.image}: {outcome.status} {outcome.error}", sys.stderr)
                        if sink:
                            sink.write(record)
                        elif not args.quiet:
                            progress.write(json.dumps(record), sys.stdout)
                    progress.update(len(outcomes))

                try:
                    async with asyncio.TaskGroup() as group:  # a Stop cancels the other requests
                        for images_of_one_request in chunks(todo, args.batch):
                            group.create_task(run(images_of_one_request))
                except* Stop as stops:
                    raise stops.exceptions[0] from None
    finally:
        progress.close()
    elapsed = time.monotonic() - started
    summary = ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items())) or "nothing to do"
    rate = counts["captioned"] / elapsed if elapsed else 0.0
    print(
        f"{summary}; {len(done)} already done, {len(skipped)} skipped (not images); "
        f"{elapsed:.1f} s, {rate:.2f} images/s",
        file=sys.stderr,
    )
    failed = sum(count for kind, count in counts.items() if kind != "captioned")
    return 0 if failed == 0 else 1


class Progress:
    """A tqdm bar on stderr where tqdm is installed (closed before the summary line), else nothing."""

    def __init__(self, total: int, quiet: bool):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, unit="img", file=sys.stderr) if tqdm and not quiet and total else None

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, line: str, stream) -> None:
        """`line` on `stream` without tearing the bar."""
        if self.bar is not None:
            self.bar.write(line, file=stream)
        else:
            print(line, file=stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def resume_command(argv: list[str]) -> str:
    command = ["blip-caption", *argv]
    if "--resume" not in command:
        command.append("--resume")
    return " ".join(shlex.quote(part) for part in command)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="blip-caption", description="Caption images and folders with a blip-serve server."
    )
    parser.add_argument("paths", nargs="+", type=Path, help="images, or folders to walk recursively")
    parser.add_argument("--url", default=os.environ.get("BLIP_SERVER_URL", "http://127.0.0.1:3000"))
    parser.add_argument("--api-key", default=os.environ.get("BLIP_API_KEY"))
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--batch", type=int, default=8, help="images per POST /captions")
    parser.add_argument("--out", help="results file: JSON Lines (one object per image), or CSV if it ends in .csv")
    parser.add_argument("--resume", action="store_true", help="skip the images --out already has captions for")
    parser.add_argument("--sidecar", action="store_true", help="write image.txt beside each image.jpg")
    parser.add_argument("--overwrite", action="store_true", help="with --sidecar: replace sidecar files that exist")
    parser.add_argument("--prompt", help="text BLIP continues, for every image")
    parser.add_argument("--retries", type=int, default=8, help="retries of a request that got 502/503/504 or no answer")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds for a whole answer to arrive")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.resume and not (args.out or args.sidecar):
        parser.error("--resume needs --out or --sidecar")
    missing = [str(path) for path in args.paths if not path.exists()]
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    counts: Counter = Counter()
    try:
        code = asyncio.run(caption_folder(args, counts))
    except Stop as exc:
        print(f"blip-caption: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        captioned = counts["captioned"]
        if args.out or args.sidecar:
            again = resume_command(sys.argv[1:] if argv is None else argv)
            print(f"\ninterrupted after {captioned} captions, all saved; to go on: {again}", file=sys.stderr)
        else:
            print(f"\ninterrupted after {captioned} captions", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
