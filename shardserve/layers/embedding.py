"""Vocab-parallel token embedding and LM head; the vocabulary is padded to a multiple of 64 × tp.

Any tp works: every rank holds an equal padded shard (the all-gather of logits needs equal sizes), so when the
vocabulary does not divide the last ranks hold fewer real rows (possibly none) and the rest is zero padding, cut off
after the gather. The imbalance is at most 64 × tp - 1 rows in all."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.layers.cpu import ops as cpu_ops
from shardserve.layers.lazy_tensor import LazyTensor
from shardserve.layers.linear import _tp_info

PAD_MULTIPLE = 64


def pad_vocab(vocab_size: int, tp_size: int) -> int:
    multiple = PAD_MULTIPLE * tp_size
    return (vocab_size + multiple - 1) // multiple * multiple


class VocabParallelEmbedding(nn.Module):
    """Rank r holds rows [r * V_r, (r + 1) * V_r) of the padded table; lookups outside are zero, then all-reduced."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32, tp: Any = None) -> None:
        super().__init__()
        self.tp = tp
        self.tp_size, self.tp_rank = _tp_info(tp)
        self.vocab_size = vocab_size
        self.padded_vocab_size = pad_vocab(vocab_size, self.tp_size)
        self.shard_size = self.padded_vocab_size // self.tp_size
        self.vocab_start = self.tp_rank * self.shard_size
        self.vocab_end = min(self.vocab_start + self.shard_size, vocab_size)  # real (unpadded) rows end here
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor) -> None:
        if loaded.shape[0] != self.vocab_size:
            raise ValueError(f"embedding has {loaded.shape[0]} rows, config vocab_size is {self.vocab_size}")
        n = max(0, self.vocab_end - self.vocab_start)
        if n:
            param.data[:n].copy_(loaded.narrow(0, self.vocab_start, n).load())
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        emb = F.embedding(local.masked_fill(outside, 0), self.weight)  # [tokens, hidden]
        emb.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(emb)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocabulary shard, gathered across ranks; padding columns are cut off."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32, tp: Any = None,
                 bias: bool = False) -> None:
        super().__init__(vocab_size, hidden_size, dtype, tp)
        if bias:
            raise ValueError("LM head bias is not supported")

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = cpu_ops.linear(hidden, self.weight, float_out=True)  # [tokens, V_r] float32
        if self.tp_size > 1:
            logits = self.tp.all_gather(logits, dim=-1)  # [tokens, V_padded]
        return logits[..., : self.vocab_size]
