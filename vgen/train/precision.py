"""Numeric precision: bf16 autocast on CUDA when the GPU supports it, and on CPUs with bf16 matmul
instructions (AMX or AVX512-BF16 run bf16 matmuls several times faster than fp32; CPUs without
them emulate bf16 and run it far slower).

`auto` is decided from what the device *is*, never from how fast it is right now: a timing taken
at start-up depends on the machine's load, and the same config once trained in fp32 under load and
in bf16 in another process. Only a CPU whose instruction set cannot be read (not x86) falls back
to timing a matmul, and says so.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names of the instructions that matter
_X86 = ("x86_64", "amd64", "i386", "i686")


def bf16_speedup(width: int, rows: int = 2048, repeats: int = 5) -> float:
    """fp32 time / bf16 time of a [rows, width] x [width, 4 width] matmul on this CPU, each the best
    of `repeats` after two warm-up calls (the first bf16 calls pay for oneDNN's kernel generation and
    can be several times slower than the rest, enough to pick fp32 on a CPU where bf16 is far
    faster; bench/RESULTS.md)."""
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


def _cpuinfo_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_bf16_instructions() -> tuple[bool | None, str]:
    """Whether this CPU has bf16 matmul instructions: (True/False, which) on x86, where the answer
    is known; (None, why) where it is not."""
    machine = platform.machine().lower()
    if machine not in _X86:
        return None, f"{machine or 'unknown'} CPU: no known bf16 instruction flags"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if amx is not None and avx512_bf16 is not None:  # torch's own cpuinfo (what oneDNN dispatches on)
        found = [name for name, probe in (("AMX", amx), ("AVX512-BF16", avx512_bf16)) if probe()]
    else:
        flags = _cpuinfo_flags()
        if flags is None:
            return None, "x86 CPU whose flags cannot be read"
        found = [name for name in BF16_CPU_FLAGS if name in flags]
    if found:
        return True, f"CPU has {' and '.join(found)}"
    return False, "CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated)"


def _cuda_bf16_native() -> bool:
    """bf16 in the GPU's hardware (Ampere and newer), not emulated (as torch counts it on V100/T4)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before the argument existed counted only native support
        return torch.cuda.is_bf16_supported()


def choose_precision(requested: str, device: torch.device, width: int) -> tuple[str, str]:
    """(precision, why) for `train.precision`; `auto` depends only on the device's capabilities,
    except on a CPU of unknown kind, where a timed matmul decides (the documented fallback)."""
    if requested != "auto":
        return requested, "set in the config"
    if device.type == "cuda":
        if _cuda_bf16_native():
            return "bf16", "auto: the GPU supports bf16"
        return "fp32", "auto: the GPU does not support bf16"
    native, why = cpu_bf16_instructions()
    if native is not None:
        return ("bf16" if native else "fp32"), f"auto: {why}"
    speedup = bf16_speedup(width)
    return ("bf16" if speedup > 1.3 else "fp32"), f"auto: {why}; a bf16 matmul measured {speedup:.1f}x fp32's speed"


def autocast_factory(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def enable_tf32(device: torch.device) -> None:
    """TF32 matmuls on Ampere+ GPUs: ~8x fp32 throughput for a 10-bit mantissa, fine for training."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
