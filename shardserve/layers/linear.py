"""Tensor-parallel linear layers; each parameter carries a weight_loader that copies in only this rank's shard.

    ReplicatedLinear            full weight on every rank
    ColumnParallelLinear        weight split on the output dim: y_r = x W_r^T   (no communication)
    MergedColumnParallelLinear  several column-parallel matrices stacked (gate/up)
    QKVParallelLinear           q, k, v stacked; KV heads replicated when tp > num_kv_heads
    RowParallelLinear           weight split on the input dim: y = all_reduce(x_r W_r^T) + b
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.layers.lazy_tensor import LazyTensor


def _tp_info(tp: Any) -> tuple[int, int]:
    """(world size, rank) of the tensor-parallel group; a missing group means tp = 1."""
    if tp is None:
        return 1, 0
    return tp.world_size, tp.rank_in_group


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({d})")
    return n // d


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
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: Any = None) -> None:
        super().__init__(in_features, out_features, bias, dtype, tp=None)

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, *args: Any) -> None:
        _copy(param.data, loaded)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; the output stays sharded (gather_output=False)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: Any = None) -> None:
        tp_size, _ = _tp_info(tp)
        super().__init__(in_features, _divide(out_features, tp_size, "output features"), bias, dtype, tp)

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, *args: Any) -> None:
        _copy(param.data, loaded.chunk(self.tp_size, 0, self.tp_rank))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several matrices with the same input stacked on the output dim (e.g. gate_proj and up_proj)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: Any = None) -> None:
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, dtype, tp)

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, shard_id: int) -> None:
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        _copy(param.data.narrow(0, offset, size), loaded.chunk(self.tp_size, 0, self.tp_rank))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix: [q heads | k heads | v heads] of this rank.

    When tp > num_kv_heads each KV head is replicated on tp / num_kv_heads ranks.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: Any = None) -> None:
        tp_size, tp_rank = _tp_info(tp)
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size, "num_attention_heads")
        if tp_size >= num_kv_heads:
            _divide(tp_size, num_kv_heads, "tensor-parallel size must be a multiple of num_key_value_heads; it")
            self.num_kv_heads = 1
            self.kv_rank = tp_rank // (tp_size // num_kv_heads)
        else:
            self.num_kv_heads = _divide(num_kv_heads, tp_size, "num_key_value_heads")
            self.kv_rank = tp_rank
        out_total = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, out_total, bias, dtype, tp)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, shard_id: str) -> None:
        if shard_id == "q":
            offset, size, rank = 0, self.q_size, self.tp_rank
        else:
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, rank = self.kv_size, self.kv_rank
        _copy(param.data.narrow(0, offset, size), loaded.narrow(0, rank * size, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial products are all-reduced, then the bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: Any = None, reduce_results: bool = True) -> None:
        tp_size, _ = _tp_info(tp)
        super().__init__(_divide(in_features, tp_size, "input features"), out_features, bias, dtype, tp)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, *args: Any) -> None:
        if param.dim() == 1:  # bias: replicated
            _copy(param.data, loaded)
        else:
            _copy(param.data, loaded.chunk(self.tp_size, 1, self.tp_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = self.tp.overlap_chunks_for(x.shape[0]) if self.tp_size > 1 and self.reduce_results else 1
        if chunks > 1 and x.dim() == 2 and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            y = self._overlapped(x, chunks)
        else:
            y = F.linear(x, self.weight)
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
