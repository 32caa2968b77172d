"""The fused Triton kernels (RMSNorm, fused add + RMSNorm, SiLU-and-mul, rotary) against the repo's torch modules:
under TRITON_INTERPRET=1 on CPU tensors here, and on CUDA where a GPU is present (same test bodies, plus bf16).

Tolerances: float32 to ~1e-6; float16 (run on CPU too: the interpreter rounds fp16 like the GPU, round to nearest
even) bit-identical for the norms and silu_and_mul, since the kernels keep the modules' rounding order. bf16 is
only checked on CUDA: the interpreter's fp32->bf16 cast truncates instead of rounding, so bf16 results under
TRITON_INTERPRET are off by ~1 ulp everywhere and say nothing about the kernels. Rotary computes in fp32 and
rounds once, while the reference rounds cos/sin and every product, so in 16-bit types the two differ by up to a few
ulps of max|q| (bound used: 2**-mantissa_bits * 2 * max|q|)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
from shardserve.layers import fused_kernels  # noqa: E402
from shardserve.layers.activation import SiluAndMul  # noqa: E402
from shardserve.layers.fused_kernels import fused_add_rms_norm, rms_norm, rotary_embedding, silu_and_mul  # noqa: E402
from shardserve.layers.norm import RMSNorm  # noqa: E402
from shardserve.layers.rotary import RotaryEmbedding, rope_parameters  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

ROPE_CONFIGS = {
    "default": {"rope_theta": 10000.0},
    "linear": {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
    "llama3": {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 64}},
}


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between two 16-bit float tensors of the same dtype."""
    assert a.dtype == b.dtype and a.element_size() == 2

    def ordered(t):
        i = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return (ordered(a) - ordered(b)).abs()


def _norm_module(hidden: int, dtype, eps: float = 1e-5) -> RMSNorm:
    norm = RMSNorm(hidden, eps, dtype).to(DEVICE)
    norm.weight.data.copy_(_randn(hidden, dtype=dtype, seed=1))
    return norm


def _check_close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    else:  # same rounding order as the module: identical up to 1 ulp (fp16 on CPU is in practice bit-identical)
        assert _ulps(got, want).max().item() <= 1


# ------------------------------------------------------------------------------------------------------ RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [96, 80, 64])
@pytest.mark.parametrize("tokens", [1, 7])
def test_rms_norm_matches_module(dtype, hidden, tokens):
    norm = _norm_module(hidden, dtype)
    x = _randn(tokens, hidden, dtype=dtype, scale=3.0)
    _check_close(rms_norm(x, norm.weight, norm.eps), norm.forward_native(x), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [96, 80])
@pytest.mark.parametrize("tokens", [1, 5])
def test_fused_add_rms_norm_matches_module(dtype, hidden, tokens):
    norm = _norm_module(hidden, dtype)
    x = _randn(tokens, hidden, dtype=dtype, scale=3.0)
    residual = _randn(tokens, hidden, dtype=dtype, seed=2)
    x0, r0 = x.clone(), residual.clone()
    out, new_residual = fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    want_out, want_residual = norm.forward_native(x, residual)
    assert torch.equal(new_residual, want_residual)  # one rounding of the fp32 sum, as torch's `x + residual`
    _check_close(out, want_out, dtype)
    assert torch.equal(x, x0) and torch.equal(residual, r0)  # out of place


def test_rms_norm_views_and_leading_dims():
    norm = _norm_module(80, torch.float32)
    wide = _randn(6, 200)
    x = wide[:, 10:90]  # rows strided by 200: read in place, no copy needed
    _check_close(rms_norm(x, norm.weight, norm.eps), norm.forward_native(x), torch.float32)
    x3 = _randn(2, 3, 80, seed=3)
    out = rms_norm(x3, norm.weight, norm.eps)
    assert out.shape == (2, 3, 80)
    _check_close(out, norm.forward_native(x3), torch.float32)
    out, res = fused_add_rms_norm(x, x3.reshape(6, 80), norm.weight, norm.eps)
    want_out, want_res = norm.forward_native(x, x3.reshape(6, 80))
    _check_close(out, want_out, torch.float32)
    assert torch.equal(res, want_res)


def test_rms_norm_promotes_like_module_with_fp32_weight():
    """fp16 activations with an fp32 weight: torch gives fp32 (`weight * x.to(fp16)`), so does the kernel."""
    norm = _norm_module(48, torch.float32)
    x = _randn(3, 48, dtype=torch.float16, scale=2.0)
    got = rms_norm(x, norm.weight, norm.eps)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, norm.forward_native(x), rtol=2e-6, atol=2e-6)


def test_empty_batches():
    norm = _norm_module(32, torch.float32)
    x = _randn(0, 32)
    assert rms_norm(x, norm.weight).shape == (0, 32)
    out, res = fused_add_rms_norm(x, x, norm.weight)
    assert out.shape == res.shape == (0, 32)
    assert silu_and_mul(_randn(0, 64)).shape == (0, 32)
    cache = _randn(8, 16)
    q, k = rotary_embedding(torch.zeros(0, dtype=torch.int64, device=DEVICE), _randn(0, 2, 16), _randn(0, 1, 16),
                            cache, cache)
    assert q.shape == (0, 2, 16) and k.shape == (0, 1, 16)


# ------------------------------------------------------------------------------------------------- SiLU and mul


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inter", [48, 40])
@pytest.mark.parametrize("tokens", [1, 5])
def test_silu_and_mul_matches_module(dtype, inter, tokens):
    x = _randn(tokens, 2 * inter, dtype=dtype, scale=4.0)
    got = silu_and_mul(x)
    assert got.shape == (tokens, inter)
    _check_close(got, SiluAndMul.forward_native(x), dtype)


def test_silu_and_mul_several_blocks_per_row(monkeypatch):
    monkeypatch.setattr(fused_kernels, "SILU_BLOCK", 16)  # inter 40 → 3 blocks, the last one masked
    x = _randn(3, 80, scale=4.0)
    _check_close(silu_and_mul(x), SiluAndMul.forward_native(x), torch.float32)
    x3 = _randn(2, 2, 80, seed=4)
    _check_close(silu_and_mul(x3), SiluAndMul.forward_native(x3), torch.float32)


# ------------------------------------------------------------------------------------------------------- Rotary


def _rope(head_dim: int, kind: str, max_position: int = 256) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, max_position, rope_parameters(ROPE_CONFIGS[kind])).to(DEVICE)


def _qkv(tokens, heads, kv_heads, dim, dtype, seed=0):
    """q and k as views of one fused qkv projection output (strided along tokens), like the attention layers."""
    qkv = _randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype, seed=seed, scale=2.0)
    q = qkv[:, :heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    return q, k


def _positions(tokens, max_position, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, max_position, (tokens,), generator=g).to(DEVICE)  # out of order, repeats allowed


def _check_rope(got, want, x, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        mantissa = {torch.float16: 10, torch.bfloat16: 7}[dtype]
        bound = 2.0 ** -mantissa * 2 * x.float().abs().max().item()
        assert (got.float() - want.float()).abs().max().item() <= bound


@pytest.mark.parametrize("kind", ["default", "linear", "llama3"])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (3, 1, 12), (2, 2, 80)])
@pytest.mark.parametrize("tokens", [1, 9])
def test_rotary_matches_module(kind, heads, kv_heads, dim, tokens):
    rope = _rope(dim, kind)
    q, k = _qkv(tokens, heads, kv_heads, dim, torch.float32)
    if tokens > 1:  # (a single-row view gets contiguous strides)
        assert q.stride(0) == k.stride(0) == (heads + 2 * kv_heads) * dim  # strided along tokens
    pos = _positions(tokens, 256)
    got_q, got_k = rotary_embedding(pos, q, k, rope.cos_cache, rope.sin_cache)
    want_q, want_k = rope.forward_native(pos, q, k)
    _check_rope(got_q, want_q, q, torch.float32)
    _check_rope(got_k, want_k, k, torch.float32)


def test_rotary_head_strided_and_dim_strided_views():
    """q strided along heads (a transposed [heads, tokens, dim] buffer) and k with a non-unit head-dim stride
    (copied by the wrapper) still match the module."""
    rope = _rope(16, "llama3")
    q = _randn(4, 5, 16).transpose(0, 1)  # [5 tokens, 4 heads, 16], stride (16, 80, 1)
    k = _randn(5, 16, 2, seed=6).transpose(1, 2)  # [5, 2, 16], stride (32, 1, 2)
    pos = torch.tensor([7, 200, 3, 3, 0], device=DEVICE)
    got_q, got_k = rotary_embedding(pos, q, k, rope.cos_cache, rope.sin_cache)
    want_q, want_k = rope.forward_native(pos, q, k)
    _check_rope(got_q, want_q, q, torch.float32)
    _check_rope(got_k, want_k, k, torch.float32)


@pytest.mark.parametrize("kind", ["default", "llama3"])
def test_rotary_fp16_within_rounding_of_module(kind):
    rope = _rope(64, kind, max_position=4096)
    q, k = _qkv(6, 4, 2, 64, torch.float16, seed=5)
    pos = torch.tensor([4095, 3, 0, 2000, 3, 17], device=DEVICE)
    got_q, got_k = rotary_embedding(pos, q, k, rope.cos_cache, rope.sin_cache)
    want_q, want_k = rope.forward_native(pos, q, k)
    _check_rope(got_q, want_q, q, torch.float16)
    _check_rope(got_k, want_k, k, torch.float16)
    exact_q, _ = rope.forward_native(pos, q.float(), k.float())  # and the kernel is within half an fp16 ulp of the exact result
    assert (got_q.float() - exact_q).abs().max().item() <= 2.0 ** -11 * q.float().abs().max().item()


# ------------------------------------------------------------------------------------------ bf16 on a real GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hidden", [4096, 80])
def test_norms_bf16_on_gpu(hidden):
    norm = _norm_module(hidden, torch.bfloat16, eps=1e-6)
    x = _randn(33, hidden, dtype=torch.bfloat16, scale=3.0)
    residual = _randn(33, hidden, dtype=torch.bfloat16, seed=2)
    _check_close(rms_norm(x, norm.weight, norm.eps), norm.forward_native(x), torch.bfloat16)
    out, new_residual = fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    want_out, want_residual = norm.forward_native(x, residual)
    assert torch.equal(new_residual, want_residual)
    _check_close(out, want_out, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("inter", [14336, 40])
def test_silu_and_mul_bf16_on_gpu(inter):
    x = _randn(17, 2 * inter, dtype=torch.bfloat16, scale=4.0)
    _check_close(silu_and_mul(x), SiluAndMul.forward_native(x), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 8, 128), (3, 1, 80)])
def test_rotary_bf16_on_gpu(heads, kv_heads, dim):
    rope = _rope(dim, "llama3", max_position=8192)
    q, k = _qkv(65, heads, kv_heads, dim, torch.bfloat16)
    pos = _positions(65, 8192)
    got_q, got_k = rotary_embedding(pos, q, k, rope.cos_cache, rope.sin_cache)
    want_q, want_k = rope.forward_native(pos, q, k)
    _check_rope(got_q, want_q, q, torch.bfloat16)
    _check_rope(got_k, want_k, k, torch.bfloat16)


# ------------------------------------------------------------------------------------------------- bad arguments


def _bad_calls():
    w = _randn(32)
    x = _randn(4, 32)
    cache = _randn(16, 8)
    q, k = _randn(4, 2, 8), _randn(4, 1, 8)
    pos = torch.arange(4, device=DEVICE)
    return {
        "norm weight size": lambda: rms_norm(x, _randn(31)),
        "norm weight 2-D": lambda: rms_norm(x, _randn(1, 32)),
        "norm int input": lambda: rms_norm(x.to(torch.int32), w),
        "norm scalar": lambda: rms_norm(_randn(()), w),
        "add residual shape": lambda: fused_add_rms_norm(x, _randn(3, 32), w),
        "add residual dtype": lambda: fused_add_rms_norm(x, x.double(), w),
        "silu odd width": lambda: silu_and_mul(_randn(4, 33)),
        "silu int input": lambda: silu_and_mul(x.to(torch.int64)),
        "rope q 2-D": lambda: rotary_embedding(pos, q.flatten(1), k, cache, cache),
        "rope k head dim": lambda: rotary_embedding(pos, q, _randn(4, 1, 6), cache, cache),
        "rope k tokens": lambda: rotary_embedding(pos, q, _randn(3, 1, 8), cache, cache),
        "rope positions count": lambda: rotary_embedding(pos[:3], q, k, cache, cache),
        "rope float positions": lambda: rotary_embedding(pos.float(), q, k, cache, cache),
        "rope 2-D positions": lambda: rotary_embedding(pos[None], q, k, cache, cache),
        "rope odd head dim": lambda: rotary_embedding(pos, _randn(4, 2, 7), _randn(4, 1, 7), _randn(16, 7),
                                                      _randn(16, 7)),
        "rope k dtype": lambda: rotary_embedding(pos, q, k.double(), cache, cache),
        "rope cache width": lambda: rotary_embedding(pos, q, k, _randn(16, 4), _randn(16, 4)),
        "rope cache mismatch": lambda: rotary_embedding(pos, q, k, cache, _randn(8, 8)),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_arguments_raise_value_error(case):
    with pytest.raises(ValueError):
        _bad_calls()[case]()
