"""Timing helpers shared by the benchmark commands: a median wall time and the machine's fp32 matmul rate."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def images_per_second(fn: Callable[[torch.Tensor], object], images: torch.Tensor, batch: int) -> float:
    """images/s of one timed pass of ``fn`` over ``images`` in batches of ``batch`` (under inference mode)."""
    batches = [images[s : s + batch] for s in range(0, len(images), batch)]
    with torch.inference_mode():
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        return len(images) / (time.perf_counter() - t0)


def matmul_gflops(n: int, repeats: int) -> float:
    """fp32 GFLOP/s of an ``n x n @ n x n`` matmul (2 n^3 FLOPs): the yardstick the model's rate is compared to."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    with torch.inference_mode():
        seconds = median_seconds(lambda: torch.mm(a, b, out=out), repeats, warmup=2)
    return 2 * n**3 / seconds / 1e9


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")  # what decides fp32/bf16 kernel speed on x86


def cpu_description() -> dict[str, object]:
    """The CPU the figures were measured on: model name and the vector-ISA flags that matter (Linux), else
    ``platform``'s guess. Results from different CPU kinds differ by tens of percent, so every JSON records it."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return {"model": model, "isa": flags}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = [f for f in ISA_FLAGS if f in value.split()]
            break
    return {"model": model, "isa": flags}
