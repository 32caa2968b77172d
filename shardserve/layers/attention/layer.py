"""The Attention layer: owns one layer's rank-local head layout, softmax scale, sliding window and logit soft-cap,
and calls the paged-attention backend with them (models never pass these to a backend themselves)."""
from __future__ import annotations

import torch
from torch import nn

from shardserve.layers.attention.base import AttentionBackend, AttentionMetadata, AttentionOutput


class Attention(nn.Module):
    """Paged attention over this step's q/k/v and the layer's KV cache.

    num_heads / num_kv_heads are this rank's (after the tensor-parallel split); query head h reads KV head
    h // (num_heads // num_kv_heads). scale defaults to head_dim ** -0.5. A query at absolute position p attends
    keys at positions j with j <= p and, with a sliding_window, j > p - sliding_window. logits_soft_cap (None = off)
    maps each scaled score s to cap * tanh(s / cap) before masking and softmax."""

    def __init__(self, num_heads: int, head_dim: int, backend: AttentionBackend, num_kv_heads: int | None = None,
                 scale: float | None = None, sliding_window: int | None = None,
                 logits_soft_cap: float | None = None) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        if logits_soft_cap is not None and logits_soft_cap <= 0:
            raise ValueError(f"logits_soft_cap must be > 0 or None, got {logits_soft_cap}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, return_lse: bool = False) -> AttentionOutput:
        """q [tokens, heads, dim] or [tokens, heads * dim], k/v [tokens, kv_heads(, dim)], kv_cache of the backend's
        kv_cache_shape → out [tokens, heads * dim], or (out, lse [tokens, heads] float32, natural log of the sum of
        exp(scores) over the attended keys) with return_lse."""
        q = q.view(-1, self.num_heads, self.head_dim)  # [tokens, heads, dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [tokens, kv_heads, dim]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.backend.forward(q, k, v, kv_cache, meta, self.scale, self.sliding_window,
                                    self.logits_soft_cap, return_lse)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"scale={self.scale:.4g}, sliding_window={self.sliding_window}, "
                f"logits_soft_cap={self.logits_soft_cap}, backend={type(self.backend).__name__}")
