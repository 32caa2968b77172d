"""The Triton paged-prefill kernel against the torch backend's prefill: under TRITON_INTERPRET=1 on CPU tensors here,
and on CUDA where a GPU is present (same test body)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
from shardserve.layers.attention import triton_prefill  # noqa: E402
from paged import random_paged_cache  # noqa: E402
from shardserve.layers.attention.base import AttentionMetadata  # noqa: E402
from shardserve.layers.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from shardserve.layers.attention.triton_prefill import paged_prefill, prefill_from_meta  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (seq_len, query_len): fresh prompts (equal) and chunks after a cached prefix (seq_len > query_len)
SEQS = [(20, 20), (37, 5), (9, 9), (45, 29), (1, 1), (17, 16)]


def _case(heads: int, kv_heads: int, dim: int, seqs: list[tuple[int, int]], block_size: int = 16,
          dtype=torch.float32):
    """A random cache (the cached prefixes), shuffled block tables, and this step's q/k/v; returns the torch
    backend's output (it writes this step's K/V into the cache) along with the inputs."""
    g = torch.Generator().manual_seed(0)
    lens = [s for s, _ in seqs]
    q_lens = [n for _, n in seqs]
    cache, tables = random_paged_cache(lens, kv_heads, dim, block_size, dtype, DEVICE, g)
    slots = []
    for i, (n, q_len) in enumerate(seqs):
        slots += [int(tables[i, p // block_size]) * block_size + p % block_size for p in range(n - q_len, n)]
    tokens = sum(q_lens)
    q = torch.randn(tokens, heads, dim, generator=g).to(DEVICE, dtype)
    k = torch.randn(tokens, kv_heads, dim, generator=g).to(DEVICE, dtype)
    v = torch.randn(tokens, kv_heads, dim, generator=g).to(DEVICE, dtype)
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots, device=DEVICE), block_tables=tables,
                             seq_lens=lens, query_lens=q_lens, seq_lens_tensor=torch.tensor(lens, device=DEVICE),
                             num_decodes=0, block_size=block_size)
    return q, k, v, cache, meta


def _check(heads, kv_heads, dim, window, seqs=SEQS, block_size=16, tol=1e-4):
    q, k, v, cache, meta = _case(heads, kv_heads, dim, seqs, block_size)
    scale = dim ** -0.5
    want = TorchAttentionBackend().forward(q, k, v, cache, meta, scale, window).view_as(q)
    got = prefill_from_meta(q, cache, meta, scale, window)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert (got - want).abs().max().item() < tol


@pytest.mark.parametrize("heads,kv_heads,dim", [(2, 2, 16), (4, 2, 24), (8, 2, 32), (4, 1, 64), (6, 2, 16)])
@pytest.mark.parametrize("window", [None, 7])
def test_paged_prefill_matches_torch_backend(heads, kv_heads, dim, window):
    _check(heads, kv_heads, dim, window)


@pytest.mark.parametrize("block_size", [8, 32])
@pytest.mark.parametrize("window", [None, 13])
def test_paged_prefill_other_block_sizes(block_size, window):
    _check(4, 2, 24, window, block_size=block_size)


@pytest.mark.parametrize("window", [None, 5, 10, 20])
def test_paged_prefill_small_tiles(monkeypatch, window):
    """Tiles smaller than the chunks: several query blocks per sequence, key tiles inside and across cache blocks,
    and the causal / window tile skipping all come into play."""
    monkeypatch.setattr(triton_prefill, "BLOCK_ROWS", 16)
    monkeypatch.setattr(triton_prefill, "BLOCK_N", 16)
    _check(4, 2, 80, window, seqs=[(45, 29), (50, 50), (3, 2), (40, 31)], block_size=32)


def test_paged_prefill_direct_call_and_sliced_q():
    """paged_prefill with explicit int tensors and no max_query_len, on a non-contiguous q."""
    q, k, v, cache, meta = _case(4, 2, 16, SEQS)
    want = TorchAttentionBackend().forward(q, k, v, cache, meta, 0.25, None).view_as(q)
    ints = dict(dtype=torch.int32, device=DEVICE)
    q_lens = torch.tensor(meta.query_lens, **ints)
    starts = torch.cumsum(q_lens, 0, dtype=torch.int32) - q_lens
    wide = torch.cat([q, q], dim=-1)[..., :16]  # row stride 2x the packed one
    got = paged_prefill(wide, cache, meta.block_tables, torch.tensor(meta.seq_lens, **ints), q_lens, starts, 0.25)
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 300])
def test_paged_prefill_bf16_on_gpu(window):
    seqs = [(1000, 1000), (700, 129), (64, 63), (2100, 900), (5, 5)]
    q, k, v, cache, meta = _case(32, 8, 128, seqs, dtype=torch.bfloat16)
    want = TorchAttentionBackend().forward(q, k, v, cache, meta, 128 ** -0.5, window).view_as(q)
    got = prefill_from_meta(q, cache, meta, 128 ** -0.5, window)
    assert (got.float() - want.float()).abs().max().item() < 2e-2
