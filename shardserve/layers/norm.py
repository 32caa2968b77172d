"""RMSNorm, optionally fused with the residual add (computed in float32 like the reference models); one Triton kernel
on GPU (layers.fused)."""
from __future__ import annotations

import torch
from torch import nn

from shardserve.layers.fused import fused_kernels_for
from shardserve.layers.lazy_tensor import LazyTensor


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = _replicated_loader

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual)."""
        if (fk := fused_kernels_for(x)) is not None:
            return fk.rms_norm(x, self.weight, self.eps) if residual is None else \
                fk.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return self.forward_native(x, residual)

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """forward in torch ops on any device (the reference the fused kernels are checked against)."""
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


def _replicated_loader(param: nn.Parameter, loaded: LazyTensor) -> None:
    t = loaded.load()
    if tuple(t.shape) != tuple(param.shape):
        raise ValueError(f"shape mismatch: checkpoint {tuple(t.shape)} vs parameter {tuple(param.shape)}")
    param.data.copy_(t)
