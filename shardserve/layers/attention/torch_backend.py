"""CPU (and fallback) paged attention.

On the CPU with the C kernels (layers.cpu.ops, float32/bfloat16), K/V are written into the cache and one
paged-attention call per layer attends every sequence of the step, decodes and (chunked) prefills alike, straight
from the cache. The torch path below is the reference and the fallback: gather each sequence's blocks, then
scaled_dot_product_attention. The cache is head-major, [2, kv_heads, blocks, block_size, dim] per layer, so a
gather of blocks lands directly in SDPA's [kv_heads, len, dim] layout (no transpose copy). Decodes are attended in
a few groups of similar length, so short sequences are not padded to the longest one. SDPA hides the log-sum-exp
and has no soft-cap, so those (return_lse=True, logits_soft_cap set) take an explicit float32 path (_explicit);
the default path is SDPA's."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shardserve.layers.attention.base import AttentionBackend, AttentionMetadata
from shardserve.layers.cpu import ops as cpu_ops

DECODE_GROUP_MIN = 8     # sequences per decode group (smaller groups cost more calls than padding saves)
DECODE_GROUPS_MAX = 4


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V [tokens, kv_heads, dim] into their slots of kv_cache [2, kv_heads, blocks, bs, dim]."""
    if cpu_ops.handles(k) and cpu_ops.write_kv_cache(k, v, kv_cache, slot_mapping):
        return
    kv_heads, dim = k.shape[-2:]
    kv_cache[0].view(kv_heads, -1, dim).index_copy_(1, slot_mapping, k.transpose(0, 1))
    kv_cache[1].view(kv_heads, -1, dim).index_copy_(1, slot_mapping, v.transpose(0, 1))


def gather_blocks(kv_cache: torch.Tensor, tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the first `length` slots of each row of block ids `tables` [seqs, nblocks]:
    [seqs, kv_heads, length, dim] each."""
    kv_heads, _, block_size, dim = kv_cache.shape[1:]
    seqs, nblocks = tables.shape
    flat = tables.reshape(-1)
    k = kv_cache[0].index_select(1, flat).view(kv_heads, seqs, nblocks * block_size, dim)[:, :, :length]
    v = kv_cache[1].index_select(1, flat).view(kv_heads, seqs, nblocks * block_size, dim)[:, :, :length]
    return k.transpose(0, 1), v.transpose(0, 1)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
          causal: bool = False) -> torch.Tensor:
    """q [..., heads, q_len, dim], k/v [..., kv_heads, kv_len, dim] with grouped-query heads.

    The query heads of one KV head are folded into the query-length dim ([kv_heads, groups * q_len, dim]), so
    K and V are never copied per query head; the mask is tiled to match."""
    groups = q.shape[-3] // k.shape[-3]
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    *lead, heads, q_len, dim = q.shape
    qg = q.reshape(*lead, k.shape[-3], groups * q_len, dim)  # row g * q_len + i = query i of head g
    if causal:  # is_causal assumes q_len == kv_len; the folded layout needs the explicit mask
        mask = torch.ones(q_len, q_len, dtype=torch.bool, device=q.device).tril()
    if mask is not None and mask.shape[-2] > 1:
        mask = mask.repeat(*([1] * (mask.dim() - 2)), groups, 1)  # [..., groups * q_len, kv_len]
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return o.reshape(*lead, heads, q_len, dim)


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              causal: bool, soft_cap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with the scores materialised in float32: q [..., heads, q_len, dim], k/v [..., kv_heads, kv_len,
    dim], mask (True = attend) broadcastable to [..., q_len, kv_len] → (out like q, lse [..., heads, q_len] float32).

    Query head h reads KV head h // groups, as in _sdpa; K/V are broadcast over the group dim, never copied."""
    *lead, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[-3], k.shape[-2]
    groups = heads // kv_heads
    qg = q.reshape(*lead, kv_heads, groups, q_len, dim).float()  # [..., kv_heads, groups, q_len, dim]
    kf, vf = k.float().unsqueeze(-3), v.float().unsqueeze(-3)  # [..., kv_heads, 1, kv_len, dim]
    s = torch.matmul(qg, kf.transpose(-1, -2)) * scale  # [..., kv_heads, groups, q_len, kv_len]
    if soft_cap is not None:
        s = soft_cap * torch.tanh(s / soft_cap)
    if causal:  # the queries are the last q_len positions of the kv_len keys
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
    if mask is not None:
        if mask.dim() > 2:  # [..., 1, q_len, kv_len] (one head dim): add a groups dim so it lines up with s
            mask = mask.unsqueeze(-3)
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [..., kv_heads, groups, q_len]
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.matmul(p, vf)  # [..., kv_heads, groups, q_len, dim]
    return out.reshape(*lead, heads, q_len, dim).to(q.dtype), lse.reshape(*lead, heads, q_len)


def _attend(q, k, v, mask, scale: float, causal: bool, soft_cap: float | None, want_lse: bool):
    """_sdpa (the default, fast path) or _explicit when a soft-cap or the LSE is asked for; → (out, lse or None)."""
    if soft_cap is None and not want_lse:
        return _sdpa(q, k, v, mask, scale, causal=causal), None
    return _explicit(q, k, v, mask, scale, causal, soft_cap)


def _row_ranges(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """(query_lens, query_starts) int64 tensors of the step, built once and shared by every layer."""
    cached = meta.derived.get("cpu_rows")
    if cached is None:
        starts, acc = [], 0
        for n in meta.query_lens:
            starts.append(acc)
            acc += n
        cached = meta.derived["cpu_rows"] = (torch.tensor(meta.query_lens, dtype=torch.int64),
                                             torch.tensor(starts, dtype=torch.int64))
    return cached


class TorchAttentionBackend(AttentionBackend):
    def kv_cache_shape(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (2, kv_heads, num_blocks, block_size, head_dim)

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float, sliding_window=None,
                logits_soft_cap=None, return_lse=False):
        write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        tokens, heads, dim = q.shape
        out = torch.empty_like(q)  # [tokens, heads, dim]
        lse = torch.empty(tokens, heads, dtype=torch.float32, device=q.device) if return_lse else None
        if cpu_ops.handles(q) and cpu_ops.paged_attention(q, out, kv_cache, meta.block_tables, meta.seq_lens_tensor,
                                                          *_row_ranges(meta), scale, sliding_window,
                                                          logits_soft_cap, lse):
            out = out.view(-1, heads * dim)
            return (out, lse) if return_lse else out
        nd = meta.num_decodes
        if nd:
            self._decode(q[:nd], out, kv_cache, meta, scale, sliding_window, logits_soft_cap, lse)
        start = nd
        for i in range(nd, len(meta.seq_lens)):
            q_len, ctx_len = meta.query_lens[i], meta.seq_lens[i]
            qi = q[start:start + q_len].transpose(0, 1)  # [heads, q_len, dim]
            if ctx_len == q_len:  # nothing cached before this chunk: use this step's K/V directly
                ki, vi = k[start:start + q_len].transpose(0, 1), v[start:start + q_len].transpose(0, 1)
            else:
                nblocks = -(-ctx_len // meta.block_size)
                ki, vi = gather_blocks(kv_cache, meta.block_tables[i:i + 1, :nblocks], ctx_len)
                ki, vi = ki[0], vi[0]  # [kv_heads, ctx_len, dim]
            o, lse_i = self._prefill(qi, ki, vi, ctx_len, scale, sliding_window, logits_soft_cap, return_lse)
            out[start:start + q_len] = o.transpose(0, 1)
            if lse is not None:
                lse[start:start + q_len] = lse_i.transpose(0, 1)  # [heads, q_len] -> [q_len, heads]
            start += q_len
        out = out.view(-1, heads * dim)
        return (out, lse) if return_lse else out

    @staticmethod
    def _prefill(q, k, v, ctx_len: int, scale: float, window: int | None, soft_cap: float | None = None,
                 want_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q [heads, q_len, dim] (the last q_len positions of the context), k/v [kv_heads, ctx_len, dim]
        → (out [heads, q_len, dim], lse [heads, q_len] or None)."""
        q_len = q.shape[1]
        if q_len == ctx_len and window is None:
            return _attend(q, k, v, None, scale, True, soft_cap, want_lse)
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device).unsqueeze(1)  # [q_len, 1]
        k_pos = torch.arange(ctx_len, device=q.device).unsqueeze(0)  # [1, ctx_len]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        return _attend(q, k, v, mask, scale, False, soft_cap, want_lse)

    @staticmethod
    def _decode(q, out, kv_cache, meta: AttentionMetadata, scale: float, window: int | None,
                soft_cap: float | None = None, lse: torch.Tensor | None = None) -> None:
        """One query token per sequence, in groups of similar context length; fills out[:nd] (and lse[:nd])."""
        nd = q.shape[0]
        lens = meta.seq_lens[:nd]
        groups = max(1, min(DECODE_GROUPS_MAX, nd // DECODE_GROUP_MIN))
        order = sorted(range(nd), key=lens.__getitem__) if groups > 1 else list(range(nd))
        for g in range(groups):
            idx = order[g * nd // groups:(g + 1) * nd // groups]
            max_len = max(lens[i] for i in idx)
            nblocks = -(-max_len // meta.block_size)
            rows = torch.tensor(idx, device=q.device) if groups > 1 else None
            tables = meta.block_tables[:nd] if rows is None else meta.block_tables.index_select(0, rows)
            k, v = gather_blocks(kv_cache, tables[:, :nblocks], max_len)  # [seqs, kv_heads, max_len, dim]
            seq_lens = meta.seq_lens_tensor[:nd] if rows is None else meta.seq_lens_tensor.index_select(0, rows)
            lens_col = seq_lens.unsqueeze(1)  # [seqs, 1]
            k_pos = torch.arange(max_len, device=q.device).unsqueeze(0)  # [1, max_len]
            mask = k_pos < lens_col
            if window is not None:
                mask &= k_pos > lens_col - 1 - window
            qi = q if rows is None else q.index_select(0, rows)
            o, lse_g = _attend(qi.unsqueeze(2), k, v, mask[:, None, None, :], scale, False, soft_cap,
                               lse is not None)
            o = o.squeeze(2)  # [seqs, heads, 1, dim] -> [seqs, heads, dim]
            if rows is None:
                out[:nd] = o
            else:
                out.index_copy_(0, rows, o)
            if lse is not None:
                lse_g = lse_g.squeeze(2)  # [seqs, heads, 1] -> [seqs, heads]
                if rows is None:
                    lse[:nd] = lse_g
                else:
                    lse.index_copy_(0, rows, lse_g)
