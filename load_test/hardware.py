"""What the hardware allows: peak FLOP/s per precision and memory bandwidth, to read a stage's
achieved rate against (`python -m load_test.ceiling`).

Two peaks per precision. The **ISA peak** is cores x clock x FLOPs one core retires per cycle, from
the instruction sets the CPU lists: AVX2 + FMA 32 fp32 FLOPs a cycle (two 256-bit FMA units), AVX-512
64 (two 512-bit units; some parts have one, so it may be twice the truth), AVX-512 BF16 128 bf16,
AMX 1,024 bf16 (Intel's figure per core). Cores are physical cores (SMT siblings share the FMA
units), the clock the highest the kernel reports. The **GEMM peak** is what torch's own matrix
multiply reaches on a large square product in that dtype: the most a stage made of matrix
multiplies can expect from this software. Bandwidth is measured with a copy loop (read + write).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch

from blip_serve.model.devices import cpu_flags

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Published dense peaks (TFLOP/s, tensor cores for bf16/fp16) and memory bandwidth (GB/s).
GPU_PEAKS = {
    "H200": ({"fp32": 67, "bf16": 989, "fp16": 989}, 4800),
    "H100": ({"fp32": 67, "bf16": 989, "fp16": 989}, 3350),
    "A100": ({"fp32": 19.5, "bf16": 312, "fp16": 312}, 2039),
    "L4": ({"fp32": 30, "bf16": 121, "fp16": 121}, 300),
}


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_clock_ghz() -> float:
    """The highest clock the kernel reports: cpufreq's maximum, else /proc/cpuinfo's MHz."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6
    except (OSError, ValueError):
        return float(cpuinfo().get("cpu MHz", 0)) / 1000


def physical_cores(threads: int) -> float:
    """Cores behind `threads` torch threads: SMT siblings (`siblings` / `cpu cores`) share one core."""
    try:
        per_core = int(cpuinfo()["siblings"]) / int(cpuinfo()["cpu cores"])
    except (KeyError, ValueError, ZeroDivisionError):
        per_core = 1
    return threads / max(per_core, 1)


def flops_per_cycle(precision: str, flags: set[str]) -> tuple[int, str]:
    """FLOPs one core retires per cycle in `precision`, and the instruction set that sets it."""
    fp32 = (64, "AVX-512 FMA") if "avx512f" in flags else (32, "AVX2 FMA") if "fma" in flags else (8, "SSE")
    if precision == "bf16":
        if "amx_bf16" in flags:
            return 1024, "AMX BF16"
        if "avx512_bf16" in flags:
            return 128, "AVX-512 BF16"
    if precision == "fp16":
        if "amx_fp16" in flags:
            return 1024, "AMX FP16"
        if "avx512_fp16" in flags:
            return 128, "AVX-512 FP16"
    return fp32 if precision == "fp32" else (fp32[0], f"{fp32[1]} (no native {precision})")


def gemm_flops(dtype: torch.dtype, device: str, size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of torch's matrix multiply on a size x size product, the best of `repeats`."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first warms up
        synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def copy_bandwidth(device: str, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second a copy loop moves (each copy reads and writes the buffer)."""
    source = torch.ones(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * 4 / best


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@functools.cache  # once a run: every batch size reads the same limits
def describe(device: str, precision: str) -> dict:
    """The machine and its limits for `precision` (the dtype of the model's matrix multiplies)."""
    measured = gemm_flops(DTYPES[precision], device)
    bandwidth = copy_bandwidth(device)
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        published = next((peaks for key, peaks in GPU_PEAKS.items() if key in name), None)
        return {
            "device": name,
            "isa_peak_flops": published[0][precision] * 1e12 if published else None,
            "isa_peak_how": "published dense peak" if published else "not in the table",
            "published_bandwidth": published[1] * 1e9 if published else None,
            "gemm_flops": measured,
            "copy_bandwidth": bandwidth,
        }
    flags = cpu_flags()
    threads = torch.get_num_threads()
    cores = physical_cores(threads)
    per_cycle, isa = flops_per_cycle(precision, flags)
    clock = cpu_clock_ghz()
    return {
        "device": f"{cpuinfo().get('model name', 'unknown CPU')}, {threads} threads on {cores:g} cores",
        "isa_peak_flops": cores * clock * 1e9 * per_cycle,
        "isa_peak_how": f"{cores:g} cores x {clock:.2f} GHz x {per_cycle} FLOP/cycle ({isa})",
        "gemm_flops": measured,
        "copy_bandwidth": bandwidth,
        "cpu_count": os.cpu_count(),
    }
