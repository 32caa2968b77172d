"""When the per-token layers (RMSNorm, rotary, SiLU-and-mul) run as fused Triton kernels (fused_kernels) instead of
chains of torch ops: on CUDA tensors when triton imports. SHARDSERVE_FUSED_KERNELS=0 turns them off; =1 forces them
on every device (CPU tensors then need TRITON_INTERPRET=1: how the tests run the kernels inside a whole model)."""
from __future__ import annotations

import functools
import os
from types import ModuleType

import torch


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
    if mode == "0" or (mode == "auto" and not x.is_cuda):
        return None
    if mode not in ("auto", "1"):
        raise ValueError(f"SHARDSERVE_FUSED_KERNELS={mode!r}; use auto, 0 or 1")
    return _module()
