"""Uploads are parsed and decoded in child processes, each decode under a CPU and a memory budget
that the operating system enforces, and killed the moment its request is answered or abandoned.

Why processes and not threads: a thread cannot be stopped inside libjpeg or libtiff, what it
allocates stays in the API worker's heap, and Pillow's Python parsers hold the GIL while the event
loop waits. A child process is stopped with one signal, gives all its memory back when it exits,
and a budget set with setrlimit holds for every format and mode, files nobody has crafted yet
included. file_checks.py refuses the known attacks early and by name; the budgets bound the rest.

    Decoders       the API worker's side: `await decoders.prepare(data, owner)` -> PreparedImage.
                   A pool for small images and a low-priority pool for large ones (a small image
                   never waits behind a large one); in each, a free process goes to the request
                   with the fewest decodes running, so a /captions of 32 cannot hold them all.
    python -m blip_serve.decode_workers CONFIG
                   the child: reads (header, bytes) frames on stdin, answers (header, pixels) on
                   stdout, exits at end of input. It answers for a large image "large" without
                   decoding it when asked for small images only, and with BLIP_GPU_DECODE "device"
                   for a JPEG that the model's device decodes once its header is checked.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import json
import logging
import os
import resource
import signal
import struct
import sys
import warnings
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, PngImagePlugin

from .errors import ClientError, PayloadTooLarge, ServiceError, Unavailable, UnsupportedImage
from .formats import ACCEPTED_TEXT
from .images import (
    ImageLimits,
    PreparedImage,
    ResizeSpec,
    decode_opened,
    device_decodable,
    open_image,
    resize_image,
    return_freed_memory_to_os,
)

logger = logging.getLogger("bentoml.blip_serve")

FRAME = struct.Struct("<II")  # header length, payload length
NO_PIXELS = np.empty((0,), np.uint8)  # an image the model's device decodes (BLIP_GPU_DECODE)


@dataclass(frozen=True)
class DecodeConfig:
    """What a child needs: the image limits, the model's input size, the budgets."""

    max_pixels: int
    max_side: int
    width: int
    height: int
    resample: int
    jpeg_draft: bool
    cpu_s: float  # CPU seconds the decode of an upload of max_pixels may take; fewer pixels, less
    memory_mb: int  # memory one upload may take, above the child's own
    large_pixels: int  # over this, an upload goes to the large pool
    idle_priority: bool = False
    device_jpegs: bool = False  # BLIP_GPU_DECODE: answer "device" for a JPEG the model's device decodes

    def cpu_budget(self, pixels: int) -> float:
        """CPU seconds for decoding an image of `pixels`: cpu_s at max_pixels, in proportion below."""
        return max(self.least_cpu_s(), self.cpu_s * pixels / self.max_pixels)

    def least_cpu_s(self) -> float:
        return min(self.cpu_s, 1.0)


# The API worker's side.
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
                "blip_serve.decode_workers",
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


# The child's side.
def memory_bytes() -> tuple[int, int]:
    """This process's (address space, resident memory)."""
    with open("/proc/self/statm") as statm:
        size, resident = statm.read().split()[:2]
    page = os.sysconf("SC_PAGE_SIZE")
    return int(size) * page, int(resident) * page


def peak_resident_bytes() -> int:
    """This process's peak resident memory. Not getrusage's ru_maxrss: after fork and exec that
    starts from the parent's size (the API worker's)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def widen_pipe(fd: int) -> None:
    """Pipes hold 64 KB: a 442 KB answer would cross in 7 pieces, each a wake-up of both processes
    (~4 ms an image, measured in a VM). 1 MB, Linux's default maximum, takes it in one."""
    try:
        fcntl.fcntl(fd, 1031, 1024 * 1024)  # F_SETPIPE_SZ
    except OSError:
        pass


PILLOW_BLOCKS_KEPT = 4  # a decoded image, the resize's intermediate and its result: ~3 MB at 640x480


def die_with_parent() -> None:
    """SIGKILL this process when the API worker that started it dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def lower_priority() -> None:
    """Run only on otherwise idle CPU time (Linux SCHED_IDLE), so that a large decode never takes a
    core from the model or from small uploads. A higher nice value is not enough: the model's
    torch threads meet at a barrier in every operation, and a decode that holds one of their cores
    for a time slice stalls them all (measured on 2 cores: normal requests' p95 went from 0.2 s
    to 2 s with nice 10 beside 40 MP decodes). No-op elsewhere."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass


def serve(config: DecodeConfig) -> None:
    Image.init()  # every plugin loaded before the memory budget is measured from here

    die_with_parent()
    # A drain's SIGTERM and a terminal's Ctrl-C reach the whole process group: this process ends
    # when its API worker does (end of input), after the requests in flight are answered.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if config.idle_priority:
        lower_priority()
    return_freed_memory_to_os()
    if not config.idle_priority:
        # Pillow keeps a few freed image blocks for the next image instead of handing them back
        # and faulting fresh pages in for every upload: a 640x480 JPEG's decode and resize took
        # 3.8 instead of 5.7 ms of CPU (2-core Xeon). Small images only: a large pool's process
        # would keep a large photo's blocks, and be replaced for its size (grown).
        Image.core.set_blocks_max(PILLOW_BLOCKS_KEPT)
    warnings.simplefilter("ignore")
    PngImagePlugin.MAX_TEXT_MEMORY = 4 * 1024 * 1024  # all of a PNG's text chunks, inflated
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    memory = memory_bytes()[0] + config.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    limits = ImageLimits(config.max_pixels, config.max_side)
    spec = ResizeSpec(config.width, config.height, Image.Resampling(config.resample))
    draft = (config.width, config.height) if config.jpeg_draft else None

    requests, answers = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print goes to the log, not into the answers
    for pipe in (requests, answers):
        widen_pipe(pipe.fileno())

    def answer(header: dict, payload: memoryview | bytes = b"") -> None:
        usage = {"rss": memory_bytes()[1]}
        if config.idle_priority:  # large images only: beside their decode the /proc read (~1 ms) is nothing
            usage["peak"] = peak_resident_bytes()
        encoded = json.dumps({**header, **usage}).encode()
        answers.write(FRAME.pack(len(encoded), len(payload)) + encoded)
        answers.write(payload)  # the pixels from where they lie: no copy into one bytes object
        answers.flush()

    answer({"ready": True})
    while head := requests.read(FRAME.size):
        header_length, payload_length = FRAME.unpack(head)
        task = json.loads(requests.read(header_length))
        data = requests.read(payload_length)
        # The CPU budget: SIGPROF, whose default action ends the process, after so much of this
        # process's CPU time, wherever it is (inside libjpeg too). Reading the header gets the
        # least; the decode a share of cpu_s in proportion to its pixels, so that a small image
        # that decodes slowly holds a process for a second, not for a 40 MP photo's budget.
        signal.setitimer(signal.ITIMER_PROF, config.least_cpu_s())
        try:
            image = open_image(data, limits)
            if config.device_jpegs and device_decodable(image, data):  # checked, not decoded: the model's device will
                answer({"device": True, "width": image.width, "height": image.height})
                continue
            if not task["large_ok"] and image.width * image.height > config.large_pixels:
                answer({"large": True})
                continue
            signal.setitimer(signal.ITIMER_PROF, config.cpu_budget(image.width * image.height))
            upright = decode_opened(image, draft)
            pixels = resize_image(upright, spec)
            answer({"width": upright.width, "height": upright.height}, pixels.data.cast("B"))
        except ClientError as exc:
            answer({"status": exc.status_code, "error": exc.message})
        except MemoryError:
            answer({"status": 413, "error": f"the image needs more than {config.memory_mb} MB to decode"})
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
            image = upright = pixels = None


if __name__ == "__main__":
    serve(DecodeConfig(**json.loads(sys.argv[1])))
