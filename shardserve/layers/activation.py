"""Activation functions: SiLU(gate) * up on a merged gate/up projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)  # [tokens, 2 * inter] -> 2 × [tokens, inter]
        return F.silu(gate) * up


def get_act_fn(name: str) -> nn.Module:
    if name not in ("silu", "swish"):
        raise ValueError(f"hidden_act {name!r} is not supported; supported: silu")
    return SiluAndMul()
