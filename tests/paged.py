"""Random paged KV caches for the attention-kernel tests: a cache with spare blocks and shuffled (non-contiguous)
block tables, so kernels that ignore the table or assume contiguity fail."""
from __future__ import annotations

import random

import torch


def random_paged_cache(lens: list[int], kv_heads: int, dim: int, block_size: int, dtype: torch.dtype, device: str,
                       g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(cache [2, kv_heads, blocks, block_size, dim], block tables [seqs, max blocks] int64 on `device`)."""
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    cache = torch.randn(2, kv_heads, num_blocks, block_size, dim, generator=g).to(device, dtype)
    ids = list(range(num_blocks))
    random.Random(0).shuffle(ids)
    width = max(-(-n // block_size) for n in lens)
    tables = torch.zeros(len(lens), width, dtype=torch.int64)
    for i, n in enumerate(lens):
        nb = -(-n // block_size)
        tables[i, :nb] = torch.tensor([ids.pop() for _ in range(nb)])
    return cache, tables.to(device)
