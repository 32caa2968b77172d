"""GPU paged prefill attention: one Triton launch for all prefill sequences of a step, reading every key and value
(cached prefix and this chunk) from the paged cache through the block table, with a flash-attention online softmax.

Layout: q [tokens, heads, dim] holds the prefill tokens of several sequences back to back; sequence i owns rows
query_start[i] : query_start[i] + query_lens[i], which are the LAST query_lens[i] positions of its context of
seq_lens[i] tokens (a fresh prompt has seq_len == query_len, a chunk after a cached prefix has seq_len > query_len).
The cache is the torch backend's, [2, kv_heads, blocks, block_size, dim] per layer, and must already hold this
step's K/V. Query at absolute position p attends keys at positions k with k <= p (and k > p - window when sliding).

Algorithm: the grid is (query block, sequence, KV head). A program folds the GROUP query heads of its KV head into
the rows of one tile (row r = query token r // GROUP_PAD, head r % GROUP_PAD), so K/V are read once per group; it
walks key tiles of BLOCK_N positions (each position's cache block looked up in the table, so any block_size works),
skipping tiles past the causal limit of its last query or wholly before the window of its first, and keeps the
running max / sum / accumulator in float32 (scores in log2 units: qk_scale = scale * log2(e)). Constexpr flags add a
logit soft-cap (SOFT_CAP: cap * tanh(s / cap), with the cap also in log2 units) and a store of each row's natural-log
log-sum-exp (m + log2(l)) * ln(2) (RETURN_LSE); with both off the kernel is the plain one. Loops are `while` loops
so the kernel also runs under TRITON_INTERPRET=1 on CPU tensors, which is how the tests check it without a GPU."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardserve.layers.attention.base import AttentionMetadata

BLOCK_ROWS = 64  # (query token, head) rows per program
BLOCK_N = 64     # key positions per inner-loop tile
LOG2E = 1.4426950408889634


@triton.jit
def _paged_prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, tables_ptr, seq_lens_ptr, query_lens_ptr,
                          query_start_ptr, qk_scale, window, soft_cap, stride_qt, stride_qh, stride_kh, stride_kb,
                          stride_ts, stride_ot, stride_oh, stride_lt,
                          GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                          DIM_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                          SOFT_CAP: tl.constexpr, RETURN_LSE: tl.constexpr):
    seq = tl.program_id(1)
    m0 = tl.program_id(0) * BLOCK_M  # first query token of this block, relative to the sequence's chunk (axis 0:
    # the only grid axis allowed more than 65,535 programs, for very long prompts)
    kvh = tl.program_id(2).to(tl.int64)
    q_len = tl.load(query_lens_ptr + seq)
    if m0 >= q_len:  # the grid covers the longest chunk; shorter ones have nothing here
        return
    ctx_len = tl.load(seq_lens_ptr + seq)
    q_start = tl.load(query_start_ptr + seq).to(tl.int64)
    prefix = ctx_len - q_len  # absolute position of the chunk's first query

    r = tl.arange(0, BLOCK_M * GROUP_PAD)
    m = m0 + r // GROUP_PAD
    g = r % GROUP_PAD
    d = tl.arange(0, DIM_PAD)
    n = tl.arange(0, BLOCK_N)
    row_ok = (m < q_len) & (g < GROUP)
    dmask = d < HEAD_DIM
    q_pos = prefix + m  # [ROWS] absolute positions
    q = tl.load(q_ptr + (q_start + m)[:, None] * stride_qt + (kvh * GROUP + g)[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & dmask[None, :], other=0.0)  # [ROWS, DIM_PAD]

    m_i = tl.full([BLOCK_M * GROUP_PAD], -1.0e30, tl.float32)  # finite, so fully masked rows give exp(-inf) = 0
    l_i = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_PAD, DIM_PAD], tl.float32)
    hi = tl.minimum(prefix + m0 + BLOCK_M, ctx_len)  # keys at >= hi are after every query of this block
    start = 0
    if HAS_WINDOW:  # start at the tile holding the first key in the window of the block's first query
        start = tl.maximum(prefix + m0 - window + 1, 0) // BLOCK_N * BLOCK_N
    while start < hi:
        k_pos = start + n  # [BLOCK_N]
        k_ok = k_pos < ctx_len
        block = tl.load(tables_ptr + seq * stride_ts + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        slot = kvh * stride_kh + block * stride_kb + (k_pos % BLOCK_SIZE) * HEAD_DIM  # [BLOCK_N]
        k = tl.load(k_ptr + slot[None, :] + d[:, None], mask=k_ok[None, :] & dmask[:, None], other=0.0)  # K^T
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [ROWS, BLOCK_N], log2 units
        if SOFT_CAP:  # soft_cap (log2 units) * tanh(s / soft_cap), tanh(x) = 1 - 2 / (exp2(2x log2 e) + 1)
            s = soft_cap * (1.0 - 2.0 / (tl.exp2((2.0 * 1.4426950408889634) * s / soft_cap) + 1.0))
        causal = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        if HAS_WINDOW:
            causal = causal & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(causal, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(v_ptr + slot[:, None] + d[None, :], mask=k_ok[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        start += BLOCK_N
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # rows past the chunk (never stored) have no keys
    out = acc / l_safe[:, None]
    tl.store(out_ptr + (q_start + m)[:, None] * stride_ot + (kvh * GROUP + g)[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dmask[None, :])
    if RETURN_LSE:  # natural log: (m + log2 l) * ln 2
        tl.store(lse_ptr + (q_start + m) * stride_lt + kvh * GROUP + g,
                 (m_i + tl.log2(l_safe)) * 0.6931471805599453, mask=row_ok)


def paged_prefill(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                  query_lens: torch.Tensor, query_start: torch.Tensor, scale: float, window: int | None = None,
                  max_query_len: int | None = None, soft_cap: float | None = None, return_lse: bool = False):
    """q [tokens, heads, dim] (each sequence's chunk, concatenated); kv_cache [2, kv_heads, blocks, block_size, dim]
    already holding this step's K/V; block_tables [seqs, max_blocks]; seq_lens / query_lens / query_start [seqs]
    int tensors on q's device (context length, chunk length, exclusive cumsum of query_lens) → out [tokens, heads,
    dim], or (out, lse [tokens, heads] float32, natural log) with return_lse.

    max_query_len sizes the grid; pass it when known to avoid a device sync."""
    tokens, heads, dim = q.shape
    kv_heads, _, block_size, _ = kv_cache.shape[1:]
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    block_m = max(1, BLOCK_ROWS // group_pad)
    if max_query_len is None:
        max_query_len = int(query_lens.max().item()) if query_lens.numel() else 0
    out = torch.empty_like(q)
    lse = torch.empty(tokens, heads, dtype=torch.float32, device=q.device) if return_lse else out  # out: unused ptr
    if tokens == 0 or max_query_len == 0:
        return (out, lse) if return_lse else out
    if q.stride(-1) != 1:
        q = q.contiguous()
    k, v = kv_cache[0], kv_cache[1]
    tables = block_tables.contiguous()
    grid = (triton.cdiv(max_query_len, block_m), seq_lens.shape[0], kv_heads)
    _paged_prefill_kernel[grid](
        q, k, v, out, lse, tables, seq_lens, query_lens, query_start, scale * LOG2E, window or 0,
        float(soft_cap or 0.0) * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), tables.stride(0), out.stride(0), out.stride(1),
        lse.stride(0),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_SIZE=block_size,
        HEAD_DIM=dim, DIM_PAD=max(16, triton.next_power_of_2(dim)), HAS_WINDOW=window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", SOFT_CAP=soft_cap is not None,
        RETURN_LSE=return_lse)
    return (out, lse) if return_lse else out


def prefill_from_meta(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                      window: int | None = None, soft_cap: float | None = None, return_lse: bool = False):
    """paged_prefill over the prefill sequences of meta (those after meta.num_decodes); q holds only their tokens."""
    nd = meta.num_decodes
    q_lens = meta.query_lens[nd:]
    cached = meta.derived.get("prefill")
    if cached is None:  # built once per step, reused by every layer
        starts = [0] * len(q_lens)
        for i in range(1, len(q_lens)):
            starts[i] = starts[i - 1] + q_lens[i - 1]
        lens = torch.tensor([meta.seq_lens[nd:], q_lens, starts], dtype=torch.int32).to(q.device)
        cached = meta.derived["prefill"] = (lens[0], lens[1], lens[2])
    return paged_prefill(q, kv_cache, meta.block_tables[nd:], *cached, scale, window,
                         max_query_len=max(q_lens, default=0), soft_cap=soft_cap, return_lse=return_lse)
