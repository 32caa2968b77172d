"""GPU paged attention: a Triton kernel for decode that walks each sequence's block table with an online softmax
(no gather of K/V into a padded copy); prefill is triton_prefill's kernel; the cache layout is the torch backend's.

One program per (sequence, KV head) handles that KV head's group of query heads. Constexpr flags add a logit
soft-cap (SOFT_CAP) and a store of each row's log-sum-exp m + log(l) (RETURN_LSE); off, the kernel is the plain one.
The kernel also runs on CPU tensors under TRITON_INTERPRET=1, which is how the tests check it without a GPU."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardserve.layers.attention.base import AttentionMetadata
from shardserve.layers.attention.torch_backend import TorchAttentionBackend, write_kv_cache
from shardserve.layers.attention.triton_prefill import prefill_from_meta


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, tables_ptr, lens_ptr, scale, window, soft_cap,
                         stride_qs, stride_qh, stride_kh, stride_kb, stride_ts, stride_os, stride_oh, stride_ls,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         SOFT_CAP: tl.constexpr, RETURN_LSE: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)  # kvh * stride_kh passes 2**31 in a large cache
    seq_len = tl.load(lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    t = tl.arange(0, BLOCK_SIZE)
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # [GROUP_PAD, DIM_PAD]
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    b = 0
    if HAS_WINDOW:  # skip blocks entirely before the window, so the first block always has a valid key
        b = tl.maximum(seq_len - window, 0) // BLOCK_SIZE
    num_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    while b < num_blocks:  # a while loop: dynamic bounds also work under TRITON_INTERPRET
        block = tl.load(tables_ptr + seq * stride_ts + b)
        pos = b * BLOCK_SIZE + t
        valid = pos < seq_len
        if HAS_WINDOW:
            valid = valid & (pos >= seq_len - window)
        offs = kvh * stride_kh + block * stride_kb + t[:, None] * HEAD_DIM + d[None, :]
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)  # [BLOCK_SIZE, DIM_PAD]
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BLOCK_SIZE]
        if SOFT_CAP:  # soft_cap * tanh(s / soft_cap), tanh(x) = 1 - 2 / (exp(2x) + 1) (saturates, never NaN)
            s = soft_cap * (1.0 - 2.0 / (tl.exp(2.0 * s / soft_cap) + 1.0))
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        b += 1
    out = acc / l_i[:, None]
    tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    if RETURN_LSE:
        tl.store(lse_ptr + seq * stride_ls + heads, m_i + tl.log(l_i), mask=gmask)


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float, window: int | None = None, soft_cap: float | None = None, return_lse: bool = False):
    """q [seqs, heads, dim]; kv_cache [2, kv_heads, blocks, block_size, dim]; block_tables [seqs, max_blocks];
    seq_lens [seqs] (context incl. this token) → out [seqs, heads, dim], or (out, lse [seqs, heads] float32)."""
    seqs, heads, dim = q.shape
    kv_heads, _, block_size, _ = kv_cache.shape[1:]
    group = heads // kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(seqs, heads, dtype=torch.float32, device=q.device) if return_lse else out  # out: unused ptr
    k, v = kv_cache[0], kv_cache[1]
    tables = block_tables.contiguous()
    _paged_decode_kernel[(seqs, kv_heads)](
        q, k, v, out, lse, tables, seq_lens.contiguous(), scale, window or 0, float(soft_cap or 0.0),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), tables.stride(0), out.stride(0), out.stride(1),
        lse.stride(0),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK_SIZE=block_size, HEAD_DIM=dim,
        DIM_PAD=triton.next_power_of_2(dim), HAS_WINDOW=window is not None, SOFT_CAP=soft_cap is not None,
        RETURN_LSE=return_lse)
    return (out, lse) if return_lse else out


class TritonAttentionBackend(TorchAttentionBackend):
    """Triton kernels over the torch backend's cache layout: paged decode (one program per sequence and KV head),
    and paged prefill for every prefill sequence of the step in one launch (triton_prefill)."""

    supports_graphs = True

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float, sliding_window=None,
                logits_soft_cap=None, return_lse=False):
        write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        tokens, heads, dim = q.shape
        nd = meta.num_decodes
        if nd == tokens:  # a pure-decode step (the CUDA-graph path): no Python lengths are read
            res = paged_decode(q, kv_cache, meta.block_tables, meta.seq_lens_tensor, scale, sliding_window,
                               logits_soft_cap, return_lse)
            if return_lse:
                return res[0].view(-1, heads * dim), res[1]
            return res.view(-1, heads * dim)
        out = torch.empty_like(q)  # [tokens, heads, dim]
        lse = torch.empty(tokens, heads, dtype=torch.float32, device=q.device) if return_lse else None
        if nd:
            res = paged_decode(q[:nd], kv_cache, meta.block_tables[:nd], meta.seq_lens_tensor[:nd], scale,
                               sliding_window, logits_soft_cap, return_lse)
            if return_lse:
                out[:nd], lse[:nd] = res
            else:
                out[:nd] = res
        res = prefill_from_meta(q[nd:], kv_cache, meta, scale, sliding_window, logits_soft_cap, return_lse)
        if return_lse:
            out[nd:], lse[nd:] = res
            return out.view(-1, heads * dim), lse
        out[nd:] = res
        return out.view(-1, heads * dim)
