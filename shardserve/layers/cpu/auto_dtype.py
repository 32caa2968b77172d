"""`--dtype auto` on a CPU: bfloat16 where the CPU computes bf16 natively and the decode kernels built, else float32.

Chosen by measurement (docs/benchmarks.md, built-in SmolLM2-135M, batch-1 decode on a 2-core AVX-512/BF16 Xeon):
with the kernels, bf16 reads half the weight bytes and its GEMV runs at the same memory bandwidth as fp32's, so a
decode step takes ~0.6x the fp32 time; without native bf16 (or without the kernels) torch converts bf16 in software
and bf16 decodes slower than fp32 (77 against 51 ms per token before the kernels). The choice is said at start-up
with the flag that overrides it; an explicit --dtype is always kept."""
from __future__ import annotations

import platform

import torch

from shardserve.layers.cpu import build, ops

X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags with bf16 dot-product instructions
ARM_BF16_FLAGS = ("bf16",)                    # Armv8.6 BF16 (Features line)


def native_bf16_flag(cpuinfo: str | None = None) -> str | None:
    """The CPU feature that gives native bf16 arithmetic, or None; `cpuinfo` is /proc/cpuinfo's text."""
    have = build.cpu_features(cpuinfo)
    return next((flag for flag in X86_BF16_FLAGS + ARM_BF16_FLAGS if flag in have), None)


def cpu_auto_dtype(cpuinfo: str | None = None, kernels: bool | None = None) -> tuple[torch.dtype, str]:
    """(dtype, why) for `--dtype auto` on the CPU."""
    flag = native_bf16_flag(cpuinfo)
    kernels = ops.available() if kernels is None else kernels
    if flag and kernels:
        return torch.bfloat16, f"this CPU has native bf16 ({flag}); a bf16 decode step takes about half the fp32 time"
    if not flag:
        return torch.float32, f"no native bf16 on this CPU ({platform.machine()}); bf16 would be slower"
    return torch.float32, "the CPU decode kernels did not build, and torch's bf16 GEMV is slower than fp32"
