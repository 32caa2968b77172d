"""Fused Triton kernels for the per-token layers around attention and the MLP: RMSNorm (optionally fused with the
residual add), SiLU-and-mul, and neox (rotate-half) rotary embedding.

Why fuse: in decode each of these ops touches a few KB per token and does almost no arithmetic, so it is bound by
memory traffic and launch overhead, not by FLOPs. The torch references run as a chain of small ops (cast to fp32,
square, mean, rsqrt, multiply, cast back, multiply by weight, ...), each reading and writing a whole tensor; the
kernels here read each input once and write each output once, in one launch:

* `rms_norm(x, weight, eps)`: one program per row, fp32 sum of squares, and the same rounding order as
  `RMSNorm._norm` (normalise in fp32, cast to x's dtype, then multiply by the weight and round once to the
  promoted dtype), so results match the module bit for bit up to the fp32 reduction order / rsqrt (at most 1 ulp
  in bf16, ~1e-6 relative in fp32).
* `fused_add_rms_norm(x, residual, weight, eps)`: the residual add (rounded to the input dtype, as torch's
  `x + residual`) and the norm of the sum, both outputs written by one kernel. Out of place: it returns fresh
  tensors and never writes into `x` or `residual`.
* `silu_and_mul(x)`: `silu(gate) * up` for x = [gate | up]; silu in fp32, rounded to x's dtype, then multiplied by
  `up` and rounded once more -- the same two roundings as `F.silu(gate) * up`, so bf16 agrees within 1 ulp
  (only the exp implementation differs) and fp32 within ~1e-6 relative.
* `rotary_embedding(positions, q, k, cos_cache, sin_cache)`: gathers cos/sin rows by position and rotates q and k
  in one launch (one program per token, all q and k heads), in fp32 with one final rounding. The torch reference
  casts cos/sin to q's dtype and rounds after each multiply and the add; in fp32 the two agree to ~1e-6, in bf16
  the kernel is the more accurate and differs from the reference by at most a few bf16 ulps of the inputs'
  magnitude (|diff| <= 2**-6 * max|q|, see the tests). q and k may be views strided along tokens/heads (e.g. slices
  of a fused qkv projection); only the head dim must be contiguous. Outputs are fresh contiguous tensors.

All kernels accept CPU tensors under TRITON_INTERPRET=1 (how the unit tests run without a GPU), so loops with
dynamic bounds would have to be `while` loops; none of these kernels need one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# One program holds a whole row in registers; beyond this the row would spill (no real model comes close:
# hidden sizes are <= 16K or so, padded to a power of two).
MAX_ROW = 65536
# silu_and_mul tiles the intermediate dim in blocks of at most this many elements (it is elementwise).
SILU_BLOCK = 1024


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_device(**tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        found = ", ".join(f"{n}={t.device}" for n, t in tensors.items())
        raise ValueError(f"tensors must be on one device, got {found}")


def _rows(name: str, x: torch.Tensor) -> torch.Tensor:
    """x [..., hidden] as a 2-D [rows, hidden] tensor with a unit stride along hidden (a view where possible)."""
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension, got a scalar")
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


# ----------------------------------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, stride_x, stride_r, stride_o, stride_ro,
                     HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # torch's `x + residual`, rounded
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / HIDDEN + eps)
    y = (xf * rstd).to(x_ptr.dtype.element_ty)  # normalise in fp32, round to the input dtype ...
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = y.to(tl.float32) * w.to(tl.float32)  # ... then weight * y, rounded once to the output dtype
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check_norm(x: torch.Tensor, weight: torch.Tensor) -> None:
    _check_float("x", x)
    _check_float("weight", weight)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., hidden], got a scalar")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape [{x.shape[-1]}] (x's last dim), got {tuple(weight.shape)}")
    if x.shape[-1] > MAX_ROW:
        raise ValueError(f"hidden size {x.shape[-1]} exceeds the single-block limit {MAX_ROW}")


def _launch_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    hidden = x.shape[-1]
    x2 = _rows("x", x)
    r2 = _rows("residual", residual) if residual is not None else x2
    out_dtype = torch.promote_types(x.dtype, weight.dtype)  # what `weight * x.to(dtype)` yields in torch
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    res_out = torch.empty_like(x2, memory_format=torch.contiguous_format) if residual is not None else out
    rows = x2.shape[0]
    if rows > 0 and hidden > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows,)](
            x2, r2, weight.contiguous(), out, res_out, float(eps),
            x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
            HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=_num_warps(block))
    shape = x.shape
    return out.view(shape), (res_out.view(shape) if residual is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of x [..., hidden] (usually [tokens, hidden]) with weight [hidden] → a fresh tensor of x's shape and
    dtype `promote_types(x.dtype, weight.dtype)`; the same rounding order as `RMSNorm._norm`."""
    _check_norm(x, weight)
    _check_device(x=x, weight=weight)
    return _launch_norm(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), like `RMSNorm.forward(x, residual)`, from one kernel. The sum is
    rounded to the input dtype before it is normalised (as torch does). Out of place: both results are fresh
    tensors; x and residual are left unchanged."""
    _check_norm(x, weight)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != x.dtype:
        raise ValueError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    _check_device(x=x, residual=residual, weight=weight)
    out, new_residual = _launch_norm(x, residual, weight, eps)
    return out, new_residual


# ------------------------------------------------------------------------------------------------ SiLU and mul


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty)  # F.silu(gate), rounded to the dtype ...
    out = act.to(tl.float32) * up  # ... times up, rounded once more
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * inter] = [gate | up] → silu(gate) * up, a fresh [..., inter] tensor of x's dtype (like
    `SiluAndMul`)."""
    _check_float("x", x)
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(f"x must be [..., 2 * inter] with an even last dim, got {tuple(x.shape)}")
    inter = x.shape[-1] // 2
    x2 = _rows("x", x)
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0 and inter > 0:
        block = min(triton.next_power_of_2(inter), SILU_BLOCK)
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, out, x2.stride(0), out.stride(0), INTER=inter, BLOCK=block, num_warps=_num_warps(block))
    return out.view(*x.shape[:-1], inter)


# ------------------------------------------------------------------------------------------------------ Rotary


@triton.jit
def _rotate(src_ptr, dst_ptr, tok, cos1, sin1, cos2, sin2, stride_st, stride_sh, stride_dt, stride_dh,
            NHEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HALF_PAD)
    mask = (h[:, None] < NHEADS) & (d[None, :] < HALF)
    src = src_ptr + tok * stride_st + h[:, None] * stride_sh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)  # [HEADS_PAD, HALF_PAD]: first half of each head
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)  # second half
    # rotate_half(x) = [-x2, x1]: out = x * cos + rotate_half(x) * sin
    o1 = x1 * cos1[None, :] - x2 * sin1[None, :]
    o2 = x2 * cos2[None, :] + x1 * sin2[None, :]
    dst = dst_ptr + tok * stride_dt + h[:, None] * stride_dh + d[None, :]
    tl.store(dst, o1.to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, o2.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                   stride_c, stride_s,
                   HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, KV_HEADS: tl.constexpr,
                   KV_HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    d = tl.arange(0, HALF_PAD)
    dmask = d < HALF
    # Both halves of the cache row are loaded (the repo's caches are cat(freqs, freqs), so they are equal, but
    # this keeps the kernel exact for any [max_position, head_dim] cache).
    cos1 = tl.load(cos_ptr + pos * stride_c + d, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + pos * stride_c + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + pos * stride_s + d, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + pos * stride_s + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    _rotate(q_ptr, qo_ptr, tok, cos1, sin1, cos2, sin2, stride_qt, stride_qh, stride_qot, stride_qoh,
            HEADS, HEADS_PAD, HALF, HALF_PAD)
    _rotate(k_ptr, ko_ptr, tok, cos1, sin1, cos2, sin2, stride_kt, stride_kh, stride_kot, stride_koh,
            KV_HEADS, KV_HEADS_PAD, HALF, HALF_PAD)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox (rotate-half) rotary embedding, like `RotaryEmbedding.forward`. positions [tokens] (integer, each in
    [0, max_position) -- not checked, to avoid a device sync), q [tokens, heads, dim], k [tokens, kv_heads, dim],
    cos_cache/sin_cache [max_position, dim] (float32 as RotaryEmbedding builds them). q and k may be strided along
    tokens and heads (views of a fused qkv output) but need a unit stride along dim. Computes in fp32 and rounds
    once; returns fresh contiguous (q_out, k_out) of q's dtype."""
    if positions.dim() != 1 or positions.dtype.is_floating_point or positions.dtype.is_complex \
            or positions.dtype == torch.bool:
        raise ValueError(f"positions must be a 1-D integer tensor, got {positions.dtype} {tuple(positions.shape)}")
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [tokens, heads, dim], got {tuple(q.shape)} and {tuple(k.shape)}")
    tokens, heads, dim = q.shape
    if k.shape[0] != tokens or k.shape[2] != dim:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in tokens and head dim")
    if positions.shape[0] != tokens:
        raise ValueError(f"positions has {positions.shape[0]} entries for {tokens} tokens")
    if dim % 2 != 0:
        raise ValueError(f"head dim must be even, got {dim}")
    _check_float("q", q)
    if k.dtype != q.dtype:
        raise ValueError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    for name, c in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        _check_float(name, c)
        if c.dim() != 2 or c.shape[1] != dim:
            raise ValueError(f"{name} must be [max_position, {dim}], got {tuple(c.shape)}")
    if cos_cache.shape != sin_cache.shape:
        raise ValueError(f"cos_cache {tuple(cos_cache.shape)} and sin_cache {tuple(sin_cache.shape)} differ")
    _check_device(positions=positions, q=q, k=k, cos_cache=cos_cache, sin_cache=sin_cache)
    if q.stride(2) != 1:
        q = q.contiguous()
    if k.stride(2) != 1:
        k = k.contiguous()
    cos_cache = cos_cache if cos_cache.stride(1) == 1 else cos_cache.contiguous()
    sin_cache = sin_cache if sin_cache.stride(1) == 1 else sin_cache.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    kv_heads = k.shape[1]
    if tokens > 0 and dim > 0:
        half = dim // 2
        tile = triton.next_power_of_2(max(heads, kv_heads)) * triton.next_power_of_2(half)
        _rotary_kernel[(tokens,)](
            positions.contiguous(), q, k, q_out, k_out, cos_cache, sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1),
            k_out.stride(0), k_out.stride(1), cos_cache.stride(0), sin_cache.stride(0),
            HEADS=heads, HEADS_PAD=triton.next_power_of_2(max(heads, 1)), KV_HEADS=kv_heads,
            KV_HEADS_PAD=triton.next_power_of_2(max(kv_heads, 1)), HALF=half,
            HALF_PAD=triton.next_power_of_2(half), num_warps=_num_warps(tile))
    return q_out, k_out
