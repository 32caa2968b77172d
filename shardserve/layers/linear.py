"""Tensor-parallel linear layers; each parameter carries a weight_loader that copies in only this rank's shard.

    ReplicatedLinear            full weight on every rank
    ColumnParallelLinear        weight split on the output dim: y_r = x W_r^T   (no communication)
    MergedColumnParallelLinear  several column-parallel matrices stacked (gate/up), each split on its own
    QKVParallelLinear           q, k, v stacked; heads split by KV group, KV heads replicated when tp > num_kv_heads
    RowParallelLinear           weight split on the input dim: y = all_reduce(x_r W_r^T) + b

Sizes need not divide by tp: a rank's slice comes from layers/tp_split.py (balanced, larger shares first; heads by
KV group), so ranks may hold slices of different sizes. Every loader narrows the checkpoint tensor to
[start, start + size) of its rank before reading.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shardserve.layers.cpu import ops as cpu_ops
from shardserve.layers.lazy_tensor import LazyTensor
from shardserve.layers.tp_split import head_partition, shard_range


def _tp_info(tp: Any) -> tuple[int, int]:
    """(world size, rank) of the tensor-parallel group; a missing group means tp = 1."""
    if tp is None:
        return 1, 0
    return tp.world_size, tp.rank_in_group


def _copy(dst: torch.Tensor, src: LazyTensor) -> None:
    t = src.load()
    if tuple(t.shape) != tuple(dst.shape):
        raise ValueError(f"shape mismatch: checkpoint shard {tuple(t.shape)} vs parameter {tuple(dst.shape)}")
    dst.copy_(t)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, tp: Any = None) -> None:
        super().__init__()
        self.tp = tp
        self.tp_size, self.tp_rank = _tp_info(tp)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, *args: Any) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_ops.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: Any = None) -> None:
        super().__init__(in_features, out_features, bias, dtype, tp=None)

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, *args: Any) -> None:
        _copy(param.data, loaded)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks (rank r: rows shard_range(out_features, tp, r)); the output stays sharded
    (gather_output=False)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: Any = None) -> None:
        tp_size, tp_rank = _tp_info(tp)
        local_out = self._partition(out_features, tp_size, tp_rank)
        super().__init__(in_features, local_out, bias, dtype, tp)

    def _partition(self, out_features: int, tp_size: int, tp_rank: int) -> int:
        """Record this rank's slice of the output features; return its size."""
        self.out_start, self.out_size = shard_range(out_features, tp_size, tp_rank)
        return self.out_size

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, *args: Any) -> None:
        _copy(param.data, loaded.narrow(0, self.out_start, self.out_size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several matrices with the same input stacked on the output dim (e.g. gate_proj and up_proj); each is split
    over the ranks on its own, and this rank's slices are stacked in the same order."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: Any = None) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, dtype, tp)

    def _partition(self, out_features: int, tp_size: int, tp_rank: int) -> int:
        self.shards = [shard_range(n, tp_size, tp_rank) for n in self.output_sizes]  # (start, size) per matrix
        self.local_offsets = [sum(size for _, size in self.shards[:i]) for i in range(len(self.shards))]
        return sum(size for _, size in self.shards)

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, shard_id: int) -> None:
        start, size = self.shards[shard_id]
        _copy(param.data.narrow(0, self.local_offsets[shard_id], size), loaded.narrow(0, start, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix: [q heads | k heads | v heads] of this rank.

    The heads are split by KV group (`tp_split.head_partition`): a rank holds whole KV heads with all of their query
    heads when tp <= num_kv_heads, else one KV head (replicated on the ranks that share its query heads) and part of
    its query heads. Ranks may hold different numbers of heads.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: Any = None) -> None:
        tp_size, tp_rank = _tp_info(tp)
        self.head_dim = head_dim
        self.partition = head_partition(num_heads, num_kv_heads, tp_size, tp_rank)
        self.num_heads, self.num_kv_heads = self.partition.q_count, self.partition.kv_count
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias, dtype, tp)

    def _partition(self, out_features: int, tp_size: int, tp_rank: int) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_range(self) -> tuple[int, int]:
        """(start, size) of this rank's query features in the full q (and o_proj input) dimension."""
        return self.partition.q_start * self.head_dim, self.q_size

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, shard_id: str) -> None:
        if shard_id == "q":
            offset, (start, size) = 0, self.q_range
        else:
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            start, size = self.partition.kv_start * self.head_dim, self.kv_size
        _copy(param.data.narrow(0, offset, size), loaded.narrow(0, start, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial products are all-reduced, then the bias is added once.

    Rank r holds input features shard_range(in_features, tp, r), or `input_shard` = (start, size) when the
    caller's column-parallel layer split them otherwise (o_proj follows the query heads' partition)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: Any = None, reduce_results: bool = True,
                 input_shard: tuple[int, int] | None = None) -> None:
        tp_size, tp_rank = _tp_info(tp)
        self.in_start, self.in_size = input_shard if input_shard is not None else \
            shard_range(in_features, tp_size, tp_rank)
        if self.in_start < 0 or self.in_start + self.in_size > in_features:
            raise ValueError(f"input shard {input_shard} is outside {in_features} input features")
        super().__init__(self.in_size, out_features, bias, dtype, tp)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, *args: Any) -> None:
        if param.dim() == 1:  # bias: replicated
            _copy(param.data, loaded)
        else:
            _copy(param.data, loaded.narrow(1, self.in_start, self.in_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = self.tp.overlap_chunks_for(x.shape[0]) if self.tp_size > 1 and self.reduce_results else 1
        if chunks > 1 and x.dim() == 2 and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            y = self._overlapped(x, chunks)
        else:
            y = cpu_ops.linear(x, self.weight)
            if self.tp_size > 1 and self.reduce_results:
                y = self.tp.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y

    def _overlapped(self, x: torch.Tensor, chunks: int) -> torch.Tensor:
        """The GEMM in `chunks` row blocks; each block's all-reduce starts as soon as it is computed and runs while
        the next block computes (NCCL stream or gloo thread), so only the last block's all-reduce is exposed."""
        y = x.new_empty(x.shape[0], self.weight.shape[0])  # [tokens, out]
        pending = []
        for x_part, y_part in zip(x.tensor_split(chunks), y.tensor_split(chunks)):  # row blocks: contiguous
            torch.matmul(x_part, self.weight.t(), out=y_part)
            pending.append(self.tp.all_reduce_async(y_part))
        for p in pending:
            p.wait()
        return y
