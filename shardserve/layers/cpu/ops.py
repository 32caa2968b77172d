"""The CPU kernels (kernels.c) behind torch-shaped calls: the per-token layers with the same names and results as the
Triton module (layers.fused_kernels: rms_norm, fused_add_rms_norm, silu_and_mul, rotary_embedding; fresh outputs),
a small-batch `linear`, and paged attention (write_kv_cache, paged_attention: decodes and prefills in one call).

Why: a batch-1 decode step on a CPU is ~120 GEMVs that must stream the weights at memory bandwidth, plus ~30 small
ops per layer that each cost a torch dispatch. torch's bf16 GEMV runs far below bandwidth on CPUs without AMX
(12-15 GB/s against ~23 GB/s here: bf16 was slower than fp32), and the small ops were half of a step. Here each
per-token op is one call, and `linear` converts bf16 weights on the fly at bandwidth.

Rounding follows the torch reference of each layer (see kernels.c), so parity holds within the same tolerances as
the reference ops: fp32 to ~1e-6 relative, bf16 within an ulp or two. SHARDSERVE_CPU_KERNELS=0 turns them off."""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from shardserve.layers.cpu import build

DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# Largest row count `linear` takes (more rows: torch's GEMM). Measured on a 2-core AVX-512/BF16 Xeon streaming the
# 121 weight matrices of SmolLM2-135M (docs/benchmarks.md): the AVX-512 GEMV beats torch up to 8 rows in fp32 and
# bf16; with AMX (bf16 tiles, K a multiple of 32) the kernel takes every row count: ahead of torch's bf16 GEMM below
# ~64 rows and level with it (0.8-1.1x, this VM's noise) at prefill sizes, and it is the one the fused decode stack
# calls (kernels.c decides).
def linear_max_rows(dtype: torch.dtype, k: int = 0) -> int:
    if dtype not in DTYPES or not available():
        return 0
    return _max_rows(DTYPES[dtype], k)


@functools.cache
def _max_rows(dt: int, k: int) -> int:
    return build.load().ss_linear_max_rows(dt, k)


def amx() -> bool:
    """Whether the bf16 GEMM runs on AMX tiles in this process."""
    return available() and bool(build.load().ss_amx_available())


def _mode() -> str:
    mode = os.environ.get("SHARDSERVE_CPU_KERNELS", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"SHARDSERVE_CPU_KERNELS={mode!r}; use auto, 0 or 1")
    return mode


def fused_on() -> bool:
    """Whether fused kernels are left on (SHARDSERVE_FUSED_KERNELS=auto, the default): =0 turns every fused kernel
    off, =1 forces the Triton ones on every device, which the C kernels must then not replace."""
    return os.environ.get("SHARDSERVE_FUSED_KERNELS", "auto") == "auto"


def available() -> bool:
    """Whether the kernels are on (not switched off) and built."""
    return _mode() != "0" and build.load() is not None


def handles(x: torch.Tensor) -> bool:
    """Whether x is a tensor these kernels take: on the CPU, float32 or bfloat16, and the kernels available."""
    return x.device.type == "cpu" and x.dtype in DTYPES and available()


def _threads() -> int:
    return torch.get_num_threads()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last] with a unit last stride (a view where possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _same_dtype(*tensors: torch.Tensor) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise ValueError(f"CPU kernels need one dtype, got {sorted(str(d) for d in dtypes)}")


# --- linear --------------------------------------------------------------------------------------------------------
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           float_out: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias); a small number of rows on the CPU goes through the bandwidth-bound kernel.
    float_out: the result in float32 -- from the kernel, its fp32 sums unrounded (the LM head: bf16 logits near 20
    are 0.125 apart and tie); from torch's GEMM, the dtype's result cast up."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (x.device.type != "cpu" or weight.dtype != x.dtype or weight.stride(-1) != 1
            or (bias is not None and bias.dtype != x.dtype) or not 0 < rows <= linear_max_rows(x.dtype, x.shape[-1])):
        y = F.linear(x, weight, bias)
        return y.float() if float_out else y
    x2 = _rows(x)
    n, k = weight.shape
    y = x2.new_empty(rows, n, dtype=torch.float32 if float_out else x.dtype)
    if bias is not None:
        bias = bias.contiguous()
    fn = build.load().ss_linear_f32out if float_out else build.load().ss_linear
    fn(DTYPES[x.dtype], x2.data_ptr(), x2.stride(0), weight.data_ptr(), weight.stride(0),
       bias.data_ptr() if bias is not None else None, y.data_ptr(), n, rows, n, k, _threads())
    return y.view(*x.shape[:-1], n)


# --- the per-token layers (the Triton module's API) -----------------------------------------------------------------
def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    _same_dtype(x, weight, *([residual] if residual is not None else []))
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype)
    r2 = _rows(residual) if residual is not None else None
    res_out = torch.empty(x2.shape, dtype=x.dtype) if residual is not None else None
    build.load().ss_rms_norm(DTYPES[x.dtype], x2.data_ptr(), x2.stride(0),
                             r2.data_ptr() if r2 is not None else None, r2.stride(0) if r2 is not None else 0,
                             weight.contiguous().data_ptr(), out.data_ptr(), out.stride(0),
                             res_out.data_ptr() if res_out is not None else None, x2.shape[1],
                             x2.shape[0], x2.shape[1], eps, _threads())
    if res_out is None:
        return out.view(x.shape)
    return out.view(x.shape), res_out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, None, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual), fresh tensors."""
    return _norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    x2 = _rows(x)
    inter = x2.shape[1] // 2
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype)
    build.load().ss_silu_and_mul(DTYPES[x.dtype], x2.data_ptr(), x2.stride(0), out.data_ptr(), inter,
                                 x2.shape[0], inter, _threads())
    return out.view(*x.shape[:-1], inter)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [tokens, heads, dim], k [tokens, kv_heads, dim] (strided views allowed, unit last stride) → rotated fresh
    contiguous copies; cos/sin float32 rows picked by position."""
    _same_dtype(q, k)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    tokens, heads, dim = q.shape
    pos = positions if positions.dtype == torch.int64 and positions.is_contiguous() else \
        positions.to(torch.int64).contiguous()
    cos, sin = cos_cache.float().contiguous(), sin_cache.float().contiguous()
    qo, ko = torch.empty(q.shape, dtype=q.dtype), torch.empty(k.shape, dtype=k.dtype)
    bad = build.load().ss_rotary(DTYPES[q.dtype], q.data_ptr(), q.stride(0), q.stride(1), heads, k.data_ptr(),
                                 k.stride(0), k.stride(1), k.shape[1], qo.data_ptr(), ko.data_ptr(), pos.data_ptr(),
                                 cos.data_ptr(), sin.data_ptr(), cos.shape[0], tokens, dim, _threads())
    if bad:
        raise IndexError(f"{bad} rotary position(s) outside [0, {cos.shape[0]}) (max_position_embeddings)")
    return qo, ko


# --- paged attention, decode ----------------------------------------------------------------------------------------
def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """K/V [tokens, kv_heads, dim] into their slots of kv_cache [2, kv_heads, blocks, block_size, dim]; False when
    the inputs are not ones the kernel takes (the caller then uses torch ops)."""
    if not (kv_cache.dtype == k.dtype == v.dtype and kv_cache.is_contiguous() and k.stride(-1) == 1
            and v.stride(-1) == 1 and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()):
        return False
    kv_heads, blocks, block_size, dim = kv_cache.shape[1:]
    build.load().ss_write_kv(DTYPES[k.dtype], k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0),
                             v.stride(1), kv_cache.data_ptr(), kv_heads, blocks * block_size, dim,
                             slot_mapping.data_ptr(), k.shape[0])
    return True


def paged_attention(q: torch.Tensor, out: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_lens: torch.Tensor, query_starts: torch.Tensor, scale: float,
                    window: int | None, soft_cap: float | None, lse: torch.Tensor | None) -> bool:
    """Attention of every sequence of a step in one call, decodes and (chunked) prefills alike, from the paged cache
    (which already holds this step's K/V). q [tokens, heads, dim]; sequence i's query_lens[i] rows start at row
    query_starts[i] and are the last positions of its seq_lens[i] context; out [tokens, heads, dim] and lse [tokens,
    heads] float32 (when given) contiguous. False when the kernel does not take these inputs."""
    ints = (block_tables, seq_lens, query_lens, query_starts)
    if not (kv_cache.dtype == q.dtype == out.dtype and kv_cache.is_contiguous() and out.is_contiguous()
            and q.stride(-1) == 1 and all(t.dtype == torch.int64 and t.is_contiguous() for t in ints)
            and (lse is None or (lse.dtype == torch.float32 and lse.is_contiguous()))):
        return False
    tokens, heads, dim = q.shape
    kv_heads, blocks, block_size = kv_cache.shape[1:4]
    bad = build.load().ss_paged_attention(
        DTYPES[q.dtype], q.data_ptr(), q.stride(0), q.stride(1), out.data_ptr(), kv_cache.data_ptr(), kv_heads,
        blocks, block_size, dim, block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr(),
        query_lens.data_ptr(), query_starts.data_ptr(), seq_lens.shape[0], tokens, heads, scale, window or 0,
        soft_cap or 0.0, lse.data_ptr() if lse is not None else None, _threads())
    if bad < 0:
        raise MemoryError("the CPU attention kernel could not allocate its work buffers")
    if bad:
        raise IndexError(f"{bad} block id(s), length(s) or query row range(s) outside the KV cache or the batch in an "
                         "attention step")
    return True
