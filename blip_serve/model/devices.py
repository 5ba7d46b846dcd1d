"""Which device, precision and thread count the model worker uses, and the supervisor's check that a
GPU asked for is there. Imports torch: the supervisor imports this only when BLIP_DEVICE=cuda."""

from __future__ import annotations

import os

import torch

from blip_serve.shared.settings import BadSetting


def pick_device(setting: str, worker: int = 1) -> str:
    """The device of model worker `worker` (1-based): its own GPU where there are several
    (BentoML shows every worker of the service all the GPUs it assigned), else the CPU."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return f"cuda:{(worker - 1) % max(1, torch.cuda.device_count())}"


def pick_precision(setting: str, device: str) -> str:
    if setting != "auto":
        return setting
    if device.startswith("cuda"):
        return "fp16"
    # bf16 pays off only where the CPU multiplies bf16 natively: AMX, or AVX-512 BF16 (a 2-core AMD
    # EPYC: hybrid compiled 1.26-1.65 against fp32's 0.92 img/s). Without either, oneDNN emulates
    # bf16 and runs 3.8x slower than fp32 (docs/performance.md).
    return "hybrid" if cpu_multiplies_bf16() else "fp32"


def pick_compile(setting: str, device: str, precision: str) -> bool:
    """BLIP_COMPILE=auto compiles wherever it pays and the precision is not the exact fp32 (a
    compiled kernel sums in another order, so a near-tie can pick another token): on a GPU (fp16:
    2.6x at batch 64 on an H200) and on a CPU running bf16 (AMX: a compiled bf16 vision tower 2.5x
    eager). fp32 on a CPU gained 7-10 %, not worth minutes of compiling (docs/performance.md)."""
    if setting != "auto":
        return setting == "on"
    return precision != "fp32"


def cpu_multiplies_bf16() -> bool:
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def cpu_flags() -> set[str]:
    """The instruction sets the CPU lists in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def pick_torch_threads(setting: int, workers: int = 1) -> int:
    if setting > 0:
        return setting
    # All the cores this process may use (docs/performance.md). Decoding runs in other processes,
    # a few ms of CPU per photo against a caption's seconds, the large ones at idle priority: no
    # core is held back for it. Several model workers on one CPU split its cores.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers)


def require_cuda() -> None:
    """BLIP_DEVICE=cuda on a host where torch sees no GPU stops the start with one line, instead of a
    model worker that fails and is restarted forever."""
    if torch.cuda.is_available():
        return
    build = f"torch {torch.__version__}, " + (
        f"CUDA {torch.version.cuda}: no GPU visible (the NVIDIA driver, or the container's GPU)"
        if torch.version.cuda
        else "a CPU-only build: install requirements-gpu.txt"
    )
    raise BadSetting(f"BLIP_DEVICE='cuda': torch sees no CUDA GPU ({build}); or set BLIP_DEVICE=auto or cpu")
