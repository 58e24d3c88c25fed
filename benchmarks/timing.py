"""Timing helpers shared by the benchmark commands: a median wall time and the machine's fp32 matmul rate."""

from __future__ import annotations

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


def matmul_gflops(n: int, repeats: int) -> float:
    """fp32 GFLOP/s of an ``n x n @ n x n`` matmul (2 n^3 FLOPs): the yardstick the model's rate is compared to."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    with torch.inference_mode():
        seconds = median_seconds(lambda: torch.mm(a, b, out=out), repeats, warmup=2)
    return 2 * n**3 / seconds / 1e9
