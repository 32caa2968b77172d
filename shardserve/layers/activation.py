"""Activation functions: SiLU(gate) * up on a merged gate/up projection (one Triton kernel on GPU: layers.fused)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.layers.fused import fused_kernels_for


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (fk := fused_kernels_for(x)) is not None:
            return fk.silu_and_mul(x)
        return self.forward_native(x)

    @staticmethod
    def forward_native(x: torch.Tensor) -> torch.Tensor:
        """forward in torch ops on any device (the reference the fused kernel is checked against)."""
        gate, up = x.chunk(2, dim=-1)  # [tokens, 2 * inter] -> 2 × [tokens, inter]
        return F.silu(gate) * up


def get_act_fn(name: str) -> nn.Module:
    if name not in ("silu", "swish"):
        raise ValueError(f"hidden_act {name!r} is not supported; supported: silu")
    return SiluAndMul()
