"""Numeric precision: bf16 autocast on CUDA, and on CPU when it measures faster (AMX / AVX512-BF16
CPUs run bf16 matmuls several times faster than fp32; older ones run them slower)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch


def bf16_speedup(width: int, rows: int = 2048, repeats: int = 5) -> float:
    """fp32 time / bf16 time of a [rows, width] x [width, 4 width] matmul on this CPU, each the best
    of `repeats` after two warm-up calls (the first bf16 calls pay for oneDNN's kernel generation and
    measured up to 5x slower than the rest, enough to pick fp32 on a CPU where bf16 is 8x faster)."""
    a, b = torch.randn(rows, width), torch.randn(width, 4 * width)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        for _ in range(2):
            x @ y
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.float32] / best[torch.bfloat16]


def choose_precision(requested: str, device: torch.device, width: int) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if bf16_speedup(width) > 1.3 else "fp32"


def autocast_factory(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def enable_tf32(device: torch.device) -> None:
    """TF32 matmuls on Ampere+ GPUs: ~8x fp32 throughput for a 10-bit mantissa, fine for training."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
