"""When the per-token layers (RMSNorm, rotary, SiLU-and-mul) run as fused kernels instead of chains of torch ops: the
Triton kernels (fused_kernels) on CUDA tensors when triton imports, the C kernels (layers.cpu.ops, same functions and
results) on float32/bfloat16 CPU tensors when they build. SHARDSERVE_FUSED_KERNELS=0 turns both off; =1 forces the
Triton ones on every device (CPU tensors then need TRITON_INTERPRET=1: how the tests run the kernels inside a whole
model); SHARDSERVE_CPU_KERNELS=0 turns off only the C ones."""
from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from shardserve.layers.cpu import ops as cpu_ops


@functools.cache
def _module() -> ModuleType | None:
    try:
        from shardserve.layers import fused_kernels
    except ImportError:  # triton is not installed: the torch ops serve
        return None
    return fused_kernels


def fused_kernels_for(x: torch.Tensor) -> ModuleType | None:
    """The fused_kernels module if `x` should go through it, else None."""
    mode = os.environ.get("SHARDSERVE_FUSED_KERNELS", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"SHARDSERVE_FUSED_KERNELS={mode!r}; use auto, 0 or 1")
    if mode == "0":
        return None
    if mode == "auto" and not x.is_cuda:
        return cpu_ops if cpu_ops.handles(x) else None
    return _module()
