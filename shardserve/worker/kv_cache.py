"""One rank's paged KV cache: the per-layer tensors the attention kernels and CUDA graphs read, their layout and
block size, and whole-block reads and writes across all layers (what a KV transfer between engines moves).

Layout of each local layer's tensor: `[2, kv_heads, num_blocks, block_size, head_dim]` (K then V, head-major, so
gathering blocks lands in attention's `[kv_heads, tokens, head_dim]` order without a transpose). `kv_heads` is this
rank's share of the KV heads. `read_blocks` / `write_blocks` move whole blocks of every local layer as one tensor
`[num_layers, 2, kv_heads, len(block_ids), block_size, head_dim]`, blocks in the order given."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

ShapeFn = Callable[[int, int, int, int], tuple[int, ...]]  # (blocks, block_size, kv_heads, head_dim) → shape


class KVCache:
    BLOCK_DIM = 2  # the block axis of a layer's tensor

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device, shape_fn: ShapeFn | None = None) -> None:
        shape = (shape_fn or _default_shape)(num_blocks, block_size, kv_heads, head_dim)
        if tuple(shape) != _default_shape(num_blocks, block_size, kv_heads, head_dim):
            raise ValueError(f"KVCache holds [2, kv_heads, blocks, block_size, head_dim] layers; the attention "
                             f"backend asked for {tuple(shape)}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.layers: list[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def block_bytes(self) -> int:
        """Bytes of one block across every local layer (K and V)."""
        return 2 * self.num_layers * self.kv_heads * self.block_size * self.head_dim * self.dtype.itemsize

    def blocks_shape(self, n: int) -> tuple[int, ...]:
        return (self.num_layers, 2, self.kv_heads, n, self.block_size, self.head_dim)

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(list(block_ids), dtype=torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_blocks):
            raise IndexError(f"block ids must be in [0, {self.num_blocks}), got {list(block_ids)}")
        return ids.to(self.layers[0].device) if self.layers else ids

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Copy of the given blocks of every layer: [num_layers, 2, kv_heads, n, block_size, head_dim]."""
        ids = self._index(block_ids)
        if not self.layers:
            return torch.empty(self.blocks_shape(len(ids)), dtype=self.dtype)
        return torch.stack([layer.index_select(self.BLOCK_DIM, ids) for layer in self.layers])

    def write_blocks(self, block_ids: Sequence[int], blocks: torch.Tensor) -> None:
        """Overwrite the given blocks of every layer with `blocks` (the layout read_blocks returns)."""
        ids = self._index(block_ids)
        want = self.blocks_shape(len(ids))
        if tuple(blocks.shape) != want:
            raise ValueError(f"KV blocks of shape {tuple(blocks.shape)} do not fit this rank's cache {want} "
                             "(same model, tp size, pipeline split and block size needed)")
        if blocks.dtype != self.dtype:
            raise ValueError(f"KV blocks are {blocks.dtype}, this cache holds {self.dtype}")
        for layer, data in zip(self.layers, blocks):
            layer.index_copy_(self.BLOCK_DIM, ids, data.to(layer.device))


def _default_shape(num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
    return (2, kv_heads, num_blocks, block_size, head_dim)
