"""A decode child: `python -m blip_serve.decoding.child CONFIG`, started by decoding/pool.py.

Reads (header, bytes) frames on stdin, answers (header, pixels) on stdout, exits at end of input,
each decode under the CPU and memory budgets in CONFIG. It answers for a large image "large" without
decoding it when asked for small images only, and with BLIP_GPU_DECODE "device" for a JPEG that the
model's device decodes once its header is checked.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import resource
import signal
import struct
import sys
import warnings
from dataclasses import dataclass

from PIL import Image, PngImagePlugin

from blip_serve.decoding.images import (
    ImageLimits,
    ResizeSpec,
    decode_opened,
    device_decodable,
    open_image,
    resize_image,
    return_freed_memory_to_os,
)
from blip_serve.shared.errors import ClientError

FRAME = struct.Struct("<II")  # header length, payload length


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
    (docs/performance.md). 1 MB, Linux's default maximum, takes it in one."""
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
    for a time slice stalls them all (docs/performance.md). No-op elsewhere."""
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
        # and faulting fresh pages in for every upload (a third less CPU an image:
        # docs/performance.md). Small images only: a large pool's process would keep a large
        # photo's blocks, and be replaced for its size (grown).
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
