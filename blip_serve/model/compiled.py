"""BLIP_COMPILE on a CPU: the vision tower and the engine's decoder step compiled ahead of time.

torch.compile traces the Python again at every start and re-folds the frozen weights: a restart
with every kernel in inductor's cache still took 121 s for the full-size model on 2 cores. Here each
part is exported once (torch.export, the batch, rows and cache length symbolic) and compiled by
AOTInductor (with freezing: the weights folded in and pre-packed for the CPU's matrix kernels) into
a package in BLIP_COMPILE_CACHE. A start that finds the package for the same weights, precision,
software and CPU loads it, a shared library and its constants, in one to three seconds.

A package holds the model's weights, so its name is a digest of everything its code depends on:
the weights' files, the precision, torch and transformers, this project's model code, and the
CPU's instruction sets (a kernel built for AMX does not run on a CPU without it). A package that
fails to load is compiled again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import transformers
from transformers.modeling_outputs import BaseModelOutputWithPooling

from blip_serve import __version__
from blip_serve.model.devices import cpu_flags

logger = logging.getLogger("bentoml.blip_serve")
INDUCTOR_OPTIONS = {"freezing": True}
LONGEST_CACHE = 8192  # positions a seat's self-attention buffers may hold (the step's symbolic bound)
UNFINISHED: set[Path] = set()  # being written: removed if the process is stopped meanwhile
# A partial package this old was left by a process killed while compiling (the OOM killer, SIGKILL):
# removed at the next compile. A compile takes minutes; one under way has a younger file.
STALE_PARTIAL_S = 3600


@contextlib.contextmanager
def stopped_at_once():
    """Compiling takes minutes at a first start (1.5-3 for the full-size model on 2 cores) and
    cannot be interrupted, and uvicorn's handlers only take note of a Ctrl-C or SIGTERM: the server
    went on compiling for as long before it stopped. The process serves nothing yet, so here it
    ends at once, and removes what it was writing (a package half written into a kept volume)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return

    def stop(signum, frame) -> None:
        logger.warning("BLIP_COMPILE: stopped (signal %d) while compiling; exiting now", signum)
        for path in list(UNFINISHED):
            remove(path)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(128 + signum)

    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def removed_afterwards(path: Path):
    """`path` (a file or a folder) for the block: removed after it, or if the process is stopped during it."""
    UNFINISHED.add(path)
    try:
        yield path
    finally:
        remove(path)
        UNFINISHED.discard(path)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def default_folder() -> str:
    """torch's own cache folder (/tmp/torchinductor_$USER), where BLIP_COMPILE_CACHE is empty."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def weights_id(model_dir: str) -> str:
    """The model's config and weight files as found on disk (each one's real path, size and time
    of change): what a package's constants came from. Hashing the contents instead took 0.8 s of a
    warm start for the full-size model on 2 cores; a hub snapshot's files are links to blobs named
    by their contents' hash anyway."""
    folder = Path(model_dir)
    files = [folder / "config.json", *sorted(folder.glob("*.safetensors")), *sorted(folder.glob("*.bin"))]
    facts = []
    for path in files:
        if path.is_file():
            real = path.resolve()
            stat = real.stat()
            facts.append(f"{path.name} {real} {stat.st_size} {stat.st_mtime_ns}")
    return "\n".join(facts)


def package_name(part: str, weights: str, **shape) -> str:
    """`part`-<digest>.pt2: the digest of everything the compiled code depends on."""
    digest = hashlib.sha256()
    for source in ("captioner.py", "engine.py", "compiled.py"):  # the model code a package was traced from
        digest.update((Path(__file__).parent / source).read_bytes())
    facts = [
        part,
        weights,
        __version__,
        torch.__version__,
        transformers.__version__,
        platform.machine(),
        " ".join(sorted(cpu_flags())),
        repr(sorted(shape.items())),
        repr(sorted(INDUCTOR_OPTIONS.items())),
    ]
    digest.update("\n".join(facts).encode())
    return f"{part}-{digest.hexdigest()[:24]}.pt2"


def load_or_compile(folder: str, name: str, export) -> tuple[object, bool]:
    """The AOTInductor runner in folder/name, compiled from `export()` (an ExportedProgram) first
    where there is none or it does not load. Returns (runner, whether it came from the folder)."""
    path = Path(folder) / name
    if path.is_file():
        try:
            return load_package(path), True
        except Exception as exc:  # a package cut short, or from other software: compile it again
            logger.warning("BLIP_COMPILE: %s does not load (%s); compiling it again", path, exc)
    with contextlib.ExitStack() as afterwards:
        if not writable(path.parent):  # the server still starts; the next start compiles again
            folder = Path(tempfile.mkdtemp(prefix="blip-compiled-"))
            path = afterwards.enter_context(removed_afterwards(folder)) / name  # a loaded package needs no file
        for left in path.parent.glob(f".{name}.*.pt2"):
            with contextlib.suppress(OSError):  # gone already: another worker removed it
                if time.time() - left.stat().st_mtime > STALE_PARTIAL_S:
                    left.unlink()
        with torch.no_grad():
            program = export()
        # Written beside its final name, then renamed: a second model worker, or a start cut short,
        # never leaves half a package under the name.
        handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".pt2")
        os.close(handle)
        with removed_afterwards(Path(partial)):
            options = dict(INDUCTOR_OPTIONS)  # a copy: it adds its own keys to the dict it is given
            torch._inductor.aoti_compile_and_package(program, package_path=partial, inductor_configs=options)
            os.replace(partial, path)
        return load_package(path), False


def writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=folder).close()
        return True
    except OSError as exc:
        logger.warning("BLIP_COMPILE_CACHE: cannot write to %s (%s); the compiled model is not kept", folder, exc)
        return False


def load_package(path: Path):
    """The package's runner. Loading unpacks the package (hundreds of MB) into an aotinductor_*
    folder under $TMPDIR that only the runner's destructor removes, and a server process ends
    without running it: every start would leave one behind. So it unpacks into a folder of our
    own, removed once loaded (the loaded library and weights need no file)."""
    with removed_afterwards(Path(tempfile.mkdtemp(prefix="blip-unpack-"))) as unpack:
        before = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(unpack)  # read by the loader's C++ (the model process is still starting)
        try:
            return torch._inductor.aoti_load_package(str(path))
        finally:
            if before is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = before


class VisionTower(torch.nn.Module):
    """BlipVisionModel's outputs as a tuple, for export."""

    def __init__(self, vision: torch.nn.Module):
        super().__init__()
        self.vision = vision

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.vision(pixel_values=pixel_values)
        return output.last_hidden_state, output.pooler_output


class DecoderStep(torch.nn.Module):
    """The engine's decode_step, for export: the decoder's weights are this module's."""

    def __init__(self, engine):
        super().__init__()
        self.decoder = engine.decoder
        self.step = engine.decode_step

    def forward(self, tokens, positions, span, self_keys, self_values, cross_keys, cross_values):
        return self.step(tokens, positions, span, self_keys, self_values, cross_keys, cross_values)


def compile_vision(
    vision: torch.nn.Module, pixel_shape, dtype, precision: str, largest: int, folder: str, weights: str
) -> bool:
    """Swap the vision tower's forward for its compiled package, for batches of 1 to `largest` (at
    least 2) images (larger ones, and calls with other options, keep the eager forward). Returns
    whether the package came from the folder. Named by the precision too: `hybrid` and `bf16` run
    the same bf16 tower, but hybrid's hands fp32 embeddings on (captioner.apply_precision)."""
    name = package_name(
        "vision", weights, pixel_shape=tuple(pixel_shape), dtype=str(dtype), precision=precision, largest=largest
    )

    def export():
        example = torch.zeros((2, *pixel_shape), dtype=dtype)
        batch = {0: torch.export.Dim("images", min=1, max=largest)}
        return torch.export.export(VisionTower(vision), (example,), dynamic_shapes=(batch,))

    runner, loaded = load_or_compile(folder, name, export)
    eager = vision.forward

    def forward(pixel_values=None, interpolate_pos_encoding=False, **kwargs):
        if interpolate_pos_encoding or any(kwargs.values()) or not 1 <= len(pixel_values) <= largest:
            return eager(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        last_hidden_state, pooler_output = runner(pixel_values)
        return BaseModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=pooler_output)

    vision.forward = forward
    return loaded


def compile_step(engine, folder: str, weights: str, precision: str) -> bool:
    """Swap the engine's decoder step for its compiled package (rows and cache length symbolic:
    one graph for every step). Returns whether the package came from the folder. Named by the
    precision too: hybrid's fp32 decoder has oneDNN-packed weights (captioner.PackedLinear)."""
    seats, dtype, image_dtype = len(engine.seats), engine.text_dtype, engine.image_dtype
    image_tokens = engine.image_tokens
    name = package_name(
        "decoder",
        weights,
        seats=seats,
        dtype=str(dtype),
        image_dtype=str(image_dtype),
        image_tokens=image_tokens,
        precision=precision,
    )

    def export():
        rows, length, capacity = min(2, seats), 32, 64
        own = [torch.zeros(seats, engine.heads, capacity, engine.head_dim, dtype=dtype) for _ in engine.layers]
        cross = [
            torch.zeros(seats, engine.heads, image_tokens, engine.head_dim, dtype=image_dtype) for _ in engine.layers
        ]
        example = (
            torch.zeros((rows, 1), dtype=torch.long),
            torch.zeros(rows, dtype=torch.long),
            torch.zeros(length),
            own,
            [buffer.clone() for buffer in own],
            cross,
            [buffer.clone() for buffer in cross],
        )
        row = {0: torch.export.Dim("rows", min=1, max=seats)} if seats > 1 else None
        span = {0: torch.export.Dim("length", min=2, max=LONGEST_CACHE)}
        buffers = [{2: torch.export.Dim("capacity", min=2, max=LONGEST_CACHE)}] * len(engine.layers)
        fixed = [None] * len(engine.layers)
        shapes = (row, row, span, buffers, buffers, fixed, fixed)
        return torch.export.export(DecoderStep(engine), example, dynamic_shapes=shapes, strict=False)

    runner, loaded = load_or_compile(folder, name, export)
    engine.step_rows = runner
    return loaded
