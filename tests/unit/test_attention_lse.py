"""Every attention backend's log-sum-exp (return_lse=True) and output against plain torch: scores q·k * scale,
soft-capped, masked (causal, sliding window, sequence length), torch.logsumexp over the keys (natural log, float32,
[tokens, heads]). Batches mix decodes, fresh prompts and chunks after a cached prefix; GQA groups of 1, 3 and 4.
The Triton kernels run under TRITON_INTERPRET=1 on CPU tensors here, compiled on CUDA where a GPU is present."""
from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
from paged import random_paged_cache  # noqa: E402
from shardserve.layers.attention import triton_prefill  # noqa: E402
from shardserve.layers.attention.base import AttentionMetadata  # noqa: E402
from shardserve.layers.attention.torch_backend import TorchAttentionBackend, _explicit  # noqa: E402
from shardserve.layers.attention.triton_backend import TritonAttentionBackend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4
# (context length, query length): three decodes first, then a fresh prompt, a chunk after a cached prefix, a one-token
# prompt and another chunk
MIXED = [(1, 1), (19, 1), (33, 1), (20, 20), (37, 5), (1, 1), (26, 11)]
NUM_DECODES = 3
LAYOUTS = [(4, 4, 16), (6, 2, 16), (8, 2, 32)]  # (heads, kv_heads, dim): groups of 1, 3, 4


def _case(seqs, num_decodes, heads, kv_heads, dim, block_size=8, q_scale=3.0):
    """q/k/v of one step, a random paged cache holding the cached prefixes (shuffled blocks), the step's metadata,
    and each sequence's whole context K/V [ctx_len, kv_heads, dim] (prefix from the cache + this step's chunk).
    q is scaled up so scores are large enough for the soft-cap to bend them."""
    g = torch.Generator().manual_seed(0)
    lens, q_lens = [n for n, _ in seqs], [m for _, m in seqs]
    cache, tables = random_paged_cache(lens, kv_heads, dim, block_size, torch.float32, DEVICE, g)
    tokens = sum(q_lens)
    q = (torch.randn(tokens, heads, dim, generator=g) * q_scale).to(DEVICE)
    k = torch.randn(tokens, kv_heads, dim, generator=g).to(DEVICE)
    v = torch.randn(tokens, kv_heads, dim, generator=g).to(DEVICE)
    flat_k = cache[0].reshape(kv_heads, -1, dim).cpu()  # [kv_heads, slots, dim]
    flat_v = cache[1].reshape(kv_heads, -1, dim).cpu()
    slots, ctx, start = [], [], 0
    for i, (n, m) in enumerate(seqs):
        pos = torch.arange(n)
        slot = tables[i].cpu()[pos // block_size] * block_size + pos % block_size  # [n]
        ki, vi = flat_k[:, slot].transpose(0, 1).clone(), flat_v[:, slot].transpose(0, 1).clone()  # [n, kv_heads, dim]
        ki[n - m:], vi[n - m:] = k[start:start + m].cpu(), v[start:start + m].cpu()
        ctx.append((ki, vi))
        slots += slot[n - m:].tolist()
        start += m
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots, device=DEVICE), block_tables=tables,
                             seq_lens=lens, query_lens=q_lens, seq_lens_tensor=torch.tensor(lens, device=DEVICE),
                             num_decodes=num_decodes, block_size=block_size)
    return q, k, v, cache, meta, ctx


def _reference(q, seqs, ctx, scale, window=None, soft_cap=None):
    """Plain torch in float64: → (out [tokens, heads * dim], lse [tokens, heads])."""
    heads, dim = q.shape[1:]
    outs, lses, start = [], [], 0
    for (n, m), (ki, vi) in zip(seqs, ctx):
        groups = heads // ki.shape[1]
        kr = ki.double().repeat_interleave(groups, dim=1)  # [n, heads, dim]: query head h reads KV head h // groups
        vr = vi.double().repeat_interleave(groups, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[start:start + m].cpu().double(), kr) * scale  # [heads, m, n]
        if soft_cap is not None:
            s = soft_cap * torch.tanh(s / soft_cap)
        q_pos, k_pos = torch.arange(n - m, n)[:, None], torch.arange(n)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        s = s.masked_fill(~mask, float("-inf"))
        lses.append(torch.logsumexp(s, dim=-1).T)  # [m, heads]
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), vr).reshape(m, heads * dim))
        start += m
    return torch.cat(outs), torch.cat(lses)


def _check(got, q, seqs, ctx, scale, window, soft_cap):
    """got = (out, lse) from a backend; also proves the tolerance would catch the usual LSE mistakes."""
    out, lse = got
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[1])
    assert out.shape == (q.shape[0], q.shape[1] * q.shape[2]) and out.dtype == q.dtype
    want_out, want_lse = _reference(q, seqs, ctx, scale, window, soft_cap)
    assert (out.cpu().double() - want_out).abs().max().item() < TOL
    assert (lse.cpu().double() - want_lse).abs().max().item() < TOL
    wrong = {"log2 units": want_lse / math.log(2), "no scale": _reference(q, seqs, ctx, 1.0, window, soft_cap)[1]}
    if soft_cap is not None:
        wrong["no soft-cap"] = _reference(q, seqs, ctx, scale, window, None)[1]
    if window is not None:
        wrong["no window"] = _reference(q, seqs, ctx, scale, None, soft_cap)[1]
    for name, bad in wrong.items():
        assert (bad - want_lse).abs().max().item() > 100 * TOL, f"the check would not catch {name}"


@pytest.mark.parametrize("heads,kv_heads,dim", LAYOUTS)
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("soft_cap", [None, 4.0])
def test_torch_backend_lse(heads, kv_heads, dim, window, soft_cap):
    q, k, v, cache, meta, ctx = _case(MIXED, NUM_DECODES, heads, kv_heads, dim)
    scale = dim ** -0.5
    got = TorchAttentionBackend().forward(q, k, v, cache, meta, scale, window, soft_cap, return_lse=True)
    _check(got, q, MIXED, ctx, scale, window, soft_cap)


def test_torch_backend_grouped_decodes_lse():
    """Enough decodes that the torch backend attends them in several length groups (rows scattered back)."""
    seqs = [(n, 1) for n in (3, 40, 7, 18, 25, 1, 33, 12, 9, 30, 2, 17, 21, 5, 38, 11)]
    q, k, v, cache, meta, ctx = _case(seqs, len(seqs), 6, 2, 16)
    got = TorchAttentionBackend().forward(q, k, v, cache, meta, 0.25, 9, None, return_lse=True)
    _check(got, q, seqs, ctx, 0.25, 9, None)


@pytest.mark.parametrize("heads,kv_heads,dim", LAYOUTS)
@pytest.mark.parametrize("window,soft_cap", [(None, None), (6, None), (None, 4.0), (6, 4.0)])
def test_triton_backend_mixed_step_lse(heads, kv_heads, dim, window, soft_cap):
    """Decode kernel for the first sequences, prefill kernel (fresh prompts and chunks after a prefix) for the rest."""
    q, k, v, cache, meta, ctx = _case(MIXED, NUM_DECODES, heads, kv_heads, dim)
    scale = dim ** -0.5
    got = TritonAttentionBackend().forward(q, k, v, cache, meta, scale, window, soft_cap, return_lse=True)
    _check(got, q, MIXED, ctx, scale, window, soft_cap)


@pytest.mark.parametrize("window,soft_cap", [(None, None), (7, 4.0)])
def test_triton_pure_decode_lse(window, soft_cap):
    """The pure-decode (CUDA-graph) path: only the decode kernel, lengths read from tensors."""
    seqs = [(1, 1), (8, 1), (9, 1), (30, 1)]
    q, k, v, cache, meta, ctx = _case(seqs, len(seqs), 8, 2, 24)
    got = TritonAttentionBackend().forward(q, k, v, cache, meta, 24 ** -0.5, window, soft_cap, return_lse=True)
    _check(got, q, seqs, ctx, 24 ** -0.5, window, soft_cap)


@pytest.mark.parametrize("window", [None, 10])
def test_triton_prefill_lse_small_tiles(monkeypatch, window):
    """Tiles smaller than the chunks: several query blocks and key tiles per sequence, so the LSE goes through the
    online rescaling and the causal / window tile skipping."""
    monkeypatch.setattr(triton_prefill, "BLOCK_ROWS", 16)
    monkeypatch.setattr(triton_prefill, "BLOCK_N", 16)
    seqs = [(45, 29), (40, 40), (3, 2)]
    q, k, v, cache, meta, ctx = _case(seqs, 0, 6, 2, 16, block_size=16)
    got = TritonAttentionBackend().forward(q, k, v, cache, meta, 0.25, window, 4.0, return_lse=True)
    _check(got, q, seqs, ctx, 0.25, window, 4.0)


@pytest.mark.parametrize("backend", [TorchAttentionBackend, TritonAttentionBackend])
def test_lse_off_is_the_default_output(backend):
    """return_lse=False returns only the output, and it equals the output that comes with the LSE."""
    q, k, v, cache, meta, ctx = _case(MIXED, NUM_DECODES, 6, 2, 16)
    plain = backend().forward(q, k, v, cache.clone(), meta, 0.25, 6)
    out, _ = backend().forward(q, k, v, cache.clone(), meta, 0.25, 6, None, True)
    assert isinstance(plain, torch.Tensor) and plain.shape == out.shape
    assert (plain - out).abs().max().item() < TOL


def test_lse_merges_partial_attention_over_key_shards():
    """What context parallelism will do: attention over two disjoint key sets, merged with their LSEs, equals
    attention over all keys."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(6, 5, 16, generator=g)  # [heads, q_len, dim]
    k, v = torch.randn(2, 30, 16, generator=g), torch.randn(2, 30, 16, generator=g)  # [kv_heads, keys, dim]
    full, lse = _explicit(q, k, v, None, 0.25, False, None)
    o1, l1 = _explicit(q, k[:, :13], v[:, :13], None, 0.25, False, None)
    o2, l2 = _explicit(q, k[:, 13:], v[:, 13:], None, 0.25, False, None)
    merged_lse = torch.logaddexp(l1, l2)  # [heads, q_len]
    merged = torch.exp(l1 - merged_lse)[..., None] * o1 + torch.exp(l2 - merged_lse)[..., None] * o2
    assert (merged_lse - lse).abs().max().item() < 1e-5
    assert (merged - full).abs().max().item() < 1e-5
