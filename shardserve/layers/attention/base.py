"""The attention backend interface and the per-step metadata (slot mapping, block tables, lengths)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

AttentionOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # out, or (out, lse) with return_lse


@dataclass
class AttentionMetadata:
    """Describes one step's flattened batch: decode sequences first (one query token each), then prefills.

    slot_mapping[t] is the KV-cache slot (block * block_size + offset) where token t's K/V are written.
    """
    slot_mapping: torch.Tensor        # [tokens] int64
    block_tables: torch.Tensor        # [seqs, max_blocks] int64, padded with 0
    seq_lens: list[int]               # context length of each seq after this step
    query_lens: list[int]             # tokens computed this step per seq
    seq_lens_tensor: torch.Tensor     # [seqs] int64
    num_decodes: int                  # the first num_decodes seqs have query_len == 1
    block_size: int
    derived: dict = field(default_factory=dict, repr=False)  # tensors a backend builds once per step, for all layers

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes


class AttentionBackend:
    """Writes this step's K/V into the paged cache and computes attention over each sequence's context."""

    supports_graphs = False  # a pure-decode forward reads only tensors (no Python lengths): CUDA-graph capturable

    def kv_cache_shape(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """Shape of one layer's K+V cache tensor; each backend picks the layout its kernels read fastest."""
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                logits_soft_cap: float | None = None, return_lse: bool = False) -> AttentionOutput:
        """q [tokens, heads, dim], k/v [tokens, kv_heads, dim], kv_cache of kv_cache_shape(...)
        → out [tokens, heads * dim], or (out, lse [tokens, heads] float32) with return_lse.

        Scores are s = q·k * scale, then logits_soft_cap * tanh(s / logits_soft_cap) when a cap is set; a query at
        absolute position p attends keys at positions j <= p (and j > p - sliding_window). The LSE is the natural
        log of the sum of exp(s) over the attended keys, so partial attentions over disjoint key sets merge
        exactly: out = Σ_i exp(lse_i - lse) out_i with lse = logsumexp_i(lse_i)."""
        raise NotImplementedError
