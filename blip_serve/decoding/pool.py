"""The API worker's side of decoding: uploads are parsed and decoded in child processes
(decoding/child.py), each decode under a CPU and a memory budget that the operating system enforces,
and killed the moment its request is answered or abandoned.

Why processes and not threads: a thread cannot be stopped inside libjpeg or libtiff, what it
allocates stays in the API worker's heap, and Pillow's Python parsers hold the GIL while the event
loop waits. A child process is stopped with one signal, gives all its memory back when it exits,
and a budget set with setrlimit holds for every format and mode, files nobody has crafted yet
included. file_checks.py refuses the known attacks early and by name; the budgets bound the rest.

    Decoders       `await decoders.prepare(data, owner)` -> PreparedImage.
                   A pool for small images and a low-priority pool for large ones (a small image
                   never waits behind a large one); in each, a free process goes to the request
                   with the fewest decodes running, so a /captions of 32 cannot hold them all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections import Counter
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np

from blip_serve.decoding.child import FRAME, DecodeConfig
from blip_serve.decoding.images import LARGE_IMAGE_PIXELS, PreparedImage, ResizeSpec
from blip_serve.formats import ACCEPTED_TEXT
from blip_serve.shared.errors import ClientError, PayloadTooLarge, ServiceError, Unavailable, UnsupportedImage

if TYPE_CHECKING:
    from blip_serve.shared.settings import Settings

logger = logging.getLogger("bentoml.blip_serve")

NO_PIXELS = np.empty((0,), np.uint8)  # an image the model's device decodes (BLIP_GPU_DECODE)


class DecodeFailed(Exception):
    pass


class DecodeProcess:
    """One child: started on first use, replaced when it dies, is killed or has grown."""

    def __init__(self, config: DecodeConfig):
        self.config = config
        self.process: asyncio.subprocess.Process | None = None
        self.starting: asyncio.Task | None = None
        self.fresh_rss = 0
        self.killed = False

    async def ready(self) -> None:
        if self.starting is None:
            self.starting = asyncio.ensure_future(self.start())
        await asyncio.shield(self.starting)

    async def start(self) -> None:
        """Start the child and wait for its hello. A child that cannot start is the server's
        fault, not the upload's: 503, and the next request tries a new one."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "blip_serve.decoding.child",
                json.dumps(asdict(self.config)),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
            )
            hello, _ = await self.receive()
        except (OSError, DecodeFailed, ValueError) as exc:
            logger.error("an image decode process did not start: %r", exc)
            raise Unavailable("the server could not start an image decoder; retry shortly") from None
        self.fresh_rss = hello["rss"]

    async def decode(self, data: bytes, large_ok: bool) -> tuple[dict, bytes]:
        await self.ready()
        header = json.dumps({"large_ok": large_ok}).encode()
        try:
            self.process.stdin.write(FRAME.pack(len(header), len(data)) + header)
            self.process.stdin.write(data)
            await self.process.stdin.drain()
        except (ConnectionError, RuntimeError):  # the child is gone: its pipe is broken, or closed
            raise DecodeFailed(await self.process.wait()) from None
        return await self.receive()

    async def receive(self) -> tuple[dict, bytes]:
        """One answer; DecodeFailed(exit status) when the child died instead (a budget, a crash)."""
        try:
            header_length, payload_length = FRAME.unpack(await self.process.stdout.readexactly(FRAME.size))
            header = json.loads(await self.process.stdout.readexactly(header_length))
            return header, await self.process.stdout.readexactly(payload_length)
        except (asyncio.IncompleteReadError, ConnectionError):
            raise DecodeFailed(await self.process.wait()) from None

    def grown(self, rss: int) -> bool:
        """Above its fresh size by more than a small decode's worth: replace it, and what a large
        decode left in its heap goes back to the operating system."""
        return rss > self.fresh_rss + 64 * 1024 * 1024

    def alive(self) -> bool:
        """Usable for the next decode: not killed, and not dead (never started counts as alive)."""
        return not self.killed and (self.process is None or self.process.returncode is None)

    def kill(self) -> None:
        self.killed = True
        if self.process is not None and self.process.returncode is None:
            self.process.kill()


class DecodePool:
    """A fixed number of child processes, handed out in turn to the requests that wait."""

    def __init__(self, size: int, config: DecodeConfig):
        self.config = config
        self.idle = [DecodeProcess(config) for _ in range(size)]
        self.waiting: list[tuple[int, asyncio.Future]] = []
        self.running: Counter[int] = Counter()  # per request: decodes now
        self.handed: Counter[int] = Counter()  # per request: processes handed out so far
        self.retiring: set[asyncio.Future] = set()

    async def warm_up(self) -> None:
        await asyncio.gather(*(process.ready() for process in self.idle))

    def retire(self, process: DecodeProcess) -> None:
        """Kill it, and reap it in the background (once started, if it is still starting)."""
        if process.starting is not None and not process.starting.done():
            process.starting.add_done_callback(lambda _: self.retire(process))
            return
        process.kill()
        if process.process is not None:
            reaped = asyncio.ensure_future(process.process.wait())
            self.retiring.add(reaped)
            reaped.add_done_callback(self.retiring.discard)

    async def close(self) -> None:
        for process in self.idle:
            self.retire(process)
        await asyncio.gather(*self.retiring)

    async def decode(self, data: bytes, owner: int, large_ok: bool) -> tuple[dict, bytes]:
        """The child's answer. A child that dies on an image is tried once more on a fresh one: it
        may have died before the image reached it (killed from outside, say), which is the server's
        fault, not the upload's. Only the CPU budget's signal is the image's at once."""
        for attempt in (1, 2):
            process = await self.take(owner)
            try:
                header, payload = await process.decode(data, large_ok)
            except BaseException as exc:  # cancelled (the request is over), or the child died
                self.retire(process)
                self.give_back(process, owner)
                if not isinstance(exc, DecodeFailed):
                    raise
                returncode = exc.args[0]
                if returncode != -signal.SIGPROF and attempt == 1:
                    logger.warning(
                        "an image decode process ended (status %s); trying the image on a new one", returncode
                    )
                    continue
                raise self.failure(returncode) from None
            if process.grown(header.get("rss", 0)):
                self.retire(process)
            self.give_back(process, owner)
            return header, payload
        raise AssertionError("unreachable")

    def failure(self, returncode: int) -> ServiceError:
        if returncode == -signal.SIGPROF:
            return PayloadTooLarge(
                "decoding the image took more CPU time than the server allows for its size "
                f"({self.config.cpu_s:g} s for {self.config.max_pixels / 1e6:g} MP, in proportion for fewer "
                "pixels): send it as an ordinary JPEG or PNG"
            )
        if returncode in (-signal.SIGKILL, -signal.SIGTERM):  # twice, from outside: not the image's doing
            return Unavailable("an image decode process was stopped from outside; retry shortly")
        return UnsupportedImage(f"the file could not be decoded: send an uncorrupted {ACCEPTED_TEXT}")

    async def take(self, owner: int) -> DecodeProcess:
        if self.idle and not self.waiting:
            self.hand_to(owner)
            return self.idle.pop()
        turn = asyncio.get_running_loop().create_future()
        self.waiting.append((owner, turn))
        try:
            return await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # handed a process just as the request ended
                self.give_back(turn.result(), owner)
            else:
                self.waiting.remove((owner, turn))
                self.forget_if_done(owner)
            raise

    def hand_to(self, owner: int) -> None:
        self.running[owner] += 1
        self.handed[owner] += 1

    def give_back(self, process: DecodeProcess, owner: int) -> None:
        """The process (a new one in its place, if it was killed or died) goes to the waiting
        request with the fewest decodes running, then the fewest handed out so far (turn by turn),
        then the earliest; or back to the idle list."""
        self.running[owner] -= 1
        self.forget_if_done(owner)
        if not process.alive():
            process = DecodeProcess(self.config)
        # A waiter whose request was cancelled has a cancelled turn before its own clean-up runs:
        # it is passed over here (handing it the process would fail, and lose the process).
        waiting = [entry for entry in self.waiting if not entry[1].done()]
        if not waiting:
            self.idle.append(process)
            return
        chosen = min(waiting, key=lambda entry: (self.running[entry[0]], self.handed[entry[0]]))
        self.waiting.remove(chosen)
        self.hand_to(chosen[0])
        chosen[1].set_result(process)

    def forget_if_done(self, owner: int) -> None:
        if self.running[owner] <= 0 and not any(waiter == owner for waiter, _ in self.waiting):
            del self.running[owner], self.handed[owner]


class Decoders:
    """Small uploads in one pool, large ones (over `large_pixels`, as the header declares) in a
    second, low-priority pool. The small pool reads every header first, so the API process never
    parses an image."""

    def __init__(self, config: DecodeConfig, small: int, large: int):
        self.small = DecodePool(small, config)
        self.large = DecodePool(large, DecodeConfig(**{**asdict(config), "idle_priority": True}))

    @classmethod
    def for_settings(cls, settings: Settings, resize: ResizeSpec) -> Decoders:
        """The pools BLIP_DECODE_PROCESSES and BLIP_MAX_CONCURRENT_DECODES ask for (by default, a
        process per core for small images and one per two cores for large ones), decoding to the
        model's input size `resize` within the BLIP_* limits and budgets."""
        config = DecodeConfig(
            max_pixels=settings.max_image_pixels,
            max_side=settings.max_image_side,
            width=resize.width,
            height=resize.height,
            resample=int(resize.resample),
            jpeg_draft=settings.jpeg_draft,
            cpu_s=settings.decode_cpu_s,
            memory_mb=settings.decode_memory_mb,
            large_pixels=LARGE_IMAGE_PIXELS,
            device_jpegs=settings.gpu_decode,
        )
        cores = len(os.sched_getaffinity(0))
        return cls(
            config,
            small=settings.decode_processes or cores,
            large=settings.max_concurrent_decodes or max(1, cores // 2),
        )

    async def warm_up(self) -> None:
        await asyncio.gather(self.small.warm_up(), self.large.warm_up())

    async def close(self) -> None:
        """Stop the idle processes (a busy one ends with its request; all end with this process)."""
        await asyncio.gather(self.small.close(), self.large.close())

    async def prepare(self, data: bytes, owner: int) -> PreparedImage:
        header, payload = await self.small.decode(data, owner, large_ok=False)
        if header.get("large"):
            header, payload = await self.large.decode(data, owner, large_ok=True)
        if "error" in header:
            raise ClientError(header["error"], status_code=header["status"])
        if header.get("device"):
            return PreparedImage(NO_PIXELS, header["width"], header["height"], jpeg=data)
        config = self.small.config
        pixels = np.frombuffer(payload, np.uint8).reshape(3, config.height, config.width)
        return PreparedImage(pixels, header["width"], header["height"])
