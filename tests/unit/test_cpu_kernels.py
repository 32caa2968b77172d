"""The C kernels of layers/cpu against the torch reference of each layer, and the fused decode layer against the
per-op layer. The kernels must build here (gcc is part of the set-up): a machine where they do not would silently
lose the CPU speed, so that is a failure, not a skip.

Tolerances: float32 to ~1e-6 relative (fp32 sums in another order); bfloat16 bit-identical where the kernel keeps
the reference's rounding points (norms, the residual add, attention on fp32-exact inputs) and within the reference's
own error against a float64 product for the GEMV; rotary computes in fp32 and rounds once, so in bf16 it differs
from the reference by at most 2 bf16 ulps of max|q| (the bound the Triton kernel's test uses)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest

from shardserve.layers.activation import SiluAndMul
from shardserve.layers.attention.base import AttentionMetadata
from shardserve.layers.attention.torch_backend import TorchAttentionBackend
from shardserve.layers.cpu import build, ops
from shardserve.layers.cpu.decode_layer import FusedDecodeLayer, supports, usable
from shardserve.layers.norm import RMSNorm
from shardserve.layers.rotary import RotaryEmbedding, rope_parameters
from shardserve.models.base import ModelShard
from shardserve.models.llama import LlamaDecoderLayer
from tests.paged import random_paged_cache

DTYPES = [torch.float32, torch.bfloat16]


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=_g(seed)) * scale).to(dtype)


def test_the_kernels_build_here():
    assert ops.available(), f"CPU kernels did not build: {build.unavailable_reason()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 17, 33, 64, 65, 300])
@pytest.mark.parametrize("n,k", [(37, 100), (96, 576), (101, 64), (64, 33)])  # AMX: K % 32 == 0, tail rows AVX-512
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_a_float64_product(dtype, rows, n, k, bias):
    x_full = _rand(rows, k + 7, dtype=dtype, seed=1)
    x = x_full[:, 3:3 + k]  # a strided view: rows at stride k + 7
    w, b = _rand(n, k, dtype=dtype, seed=2), (_rand(n, dtype=dtype, seed=3) if bias else None)
    got = ops.linear(x, w, b)
    want = F.linear(x.double(), w.double(), b.double() if b is not None else None)
    torch_err = (F.linear(x, w, b).double() - want).abs().max().item()
    assert got.shape == (rows, n) and got.dtype == dtype
    err = (got.double() - want).abs().max().item()
    if dtype == torch.float32:  # fp32 sums in another order than torch's: as close as torch's own
        assert err <= max(2 * torch_err, 1e-6 * want.abs().max().item())
    else:  # one rounding of an fp32 sum, like torch's own bf16 GEMM
        assert err <= max(torch_err, 2 ** -8 * want.abs().max().item()) * 1.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_linear_float_out_keeps_the_fp32_sums(dtype, rows):
    """The LM head's logits in float32: the kernel's sums unrounded (closer to a float64 product than the dtype's
    rounded result), torch's GEMM result cast up past the kernel's row limit."""
    x, w = _rand(rows, 576, dtype=dtype, seed=1), _rand(101, 576, dtype=dtype, seed=2)
    got = ops.linear(x, w, float_out=True)
    want = F.linear(x.double(), w.double())
    assert got.dtype == torch.float32
    if rows <= ops.linear_max_rows(dtype, 576):
        err = (got.double() - want).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item()  # fp32 sums: no dtype rounding left
    else:
        assert torch.equal(got, F.linear(x, w).float())


def test_amx_is_reported_with_its_row_limit():
    assert ops.linear_max_rows(torch.float32, 576) == 8
    assert ops.linear_max_rows(torch.bfloat16, 576) == (1 << 30 if ops.amx() else 8)  # AMX: every row count
    assert ops.linear_max_rows(torch.bfloat16, 100) == 8  # K not a multiple of 32: no AMX
    assert ops.linear_max_rows(torch.float16, 576) == 0


def test_linear_keeps_leading_dims_and_falls_back_for_other_dtypes():
    x, w = _rand(2, 1, 48, seed=1), _rand(24, 48, seed=2)
    torch.testing.assert_close(ops.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    xh, wh = x.half(), w.half()
    assert torch.equal(ops.linear(xh, wh), F.linear(xh, wh))  # float16: torch's own GEMM
    x0 = torch.empty(0, 48)
    assert ops.linear(x0, w).shape == (0, 24)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_rms_norm_and_fused_add_match_the_module(dtype, tokens):
    norm = RMSNorm(576, 1e-5, dtype)
    norm.weight.data.copy_(_rand(576, dtype=dtype, seed=4))
    x, r = _rand(tokens, 576, dtype=dtype, seed=5), _rand(tokens, 576, dtype=dtype, seed=6)
    got, got_res = ops.fused_add_rms_norm(x, r, norm.weight, norm.eps)
    want, want_res = norm.forward_native(x, r)
    assert torch.equal(got_res, want_res)
    got1, want1 = ops.rms_norm(x, norm.weight, norm.eps), norm.forward_native(x)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want) and torch.equal(got1, want1)
    else:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(got1, want1, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_the_module(dtype):
    x = _rand(3, 2 * 200, dtype=dtype, seed=7, scale=3.0)
    got, want = ops.silu_and_mul(x), SiluAndMul.forward_native(x)
    tol = 2e-6 if dtype == torch.float32 else 2 ** -7  # bf16: the exp may differ by an ulp before rounding
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope", [{"rope_theta": 10000.0},
                                  {"rope_theta": 500000.0, "rope_scaling": {
                                      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}])
def test_rotary_matches_the_module_on_strided_views(dtype, rope):
    rot = RotaryEmbedding(64, 4096, rope_parameters(rope))
    qkv = _rand(5, (9 + 2 * 3) * 64, dtype=dtype, seed=8)
    q, k = qkv[:, :576].view(5, 9, 64), qkv[:, 576:768].view(5, 3, 64)
    pos = torch.tensor([0, 7, 100, 2047, 4095])
    gq, gk = ops.rotary_embedding(pos, q, k, rot.cos_cache, rot.sin_cache)
    wq, wk = rot.forward_native(pos, q, k)
    if dtype == torch.float32:
        torch.testing.assert_close(gq, wq, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(gk, wk, rtol=2e-6, atol=2e-6)
    else:
        assert (gq.float() - wq.float()).abs().max() <= 2 ** -7 * 2 * q.float().abs().max()
        assert (gk.float() - wk.float()).abs().max() <= 2 ** -7 * 2 * k.float().abs().max()


def test_rotary_refuses_a_position_past_the_table():
    rot = RotaryEmbedding(64, 16, rope_parameters({}))
    q, k = _rand(1, 2, 64), _rand(1, 1, 64)
    with pytest.raises(IndexError, match="outside"):
        ops.rotary_embedding(torch.tensor([16]), q, k, rot.cos_cache, rot.sin_cache)


def _step_meta(specs: list[tuple[int, int]], tables: torch.Tensor, block_size: int) -> AttentionMetadata:
    """A step of (context length, query length) sequences, decodes (query length 1) first."""
    lens, q_lens = [c for c, _ in specs], [n for _, n in specs]
    slots = [int(tables[i, p // block_size]) * block_size + p % block_size
             for i, (c, n) in enumerate(specs) for p in range(c - n, c)]
    return AttentionMetadata(slot_mapping=torch.tensor(slots), block_tables=tables, seq_lens=lens,
                             query_lens=q_lens, seq_lens_tensor=torch.tensor(lens),
                             num_decodes=sum(1 for n in q_lens if n == 1), block_size=block_size)


# decodes, whole prompts, chunks after a cached prefix, a 1-row tail tile, 2-3 row chunks (per-row path), 64+ rows
STEP = [(7, 1), (1, 1), (33, 1), (40, 40), (50, 23), (19, 2), (64, 64), (5, 3), (81, 17), (130, 97)]
SHAPES = {"gqa": (6, 2, 64, 4), "mqa_dim80": (8, 1, 80, 16), "mha_dim24": (4, 4, 24, 16), "smollm": (9, 3, 64, 16)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,cap,lse", [(None, None, False), (5, None, False), (None, 20.0, True),
                                            (3, 30.0, True), (20, None, True)])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_paged_attention_and_kv_write_match_the_torch_path(dtype, window, cap, lse, shape, monkeypatch):
    """One C call for decodes and (chunked) prefills together against the torch reference (SDPA / explicit)."""
    heads, kv_heads, dim, bs = SHAPES[shape]
    cache, tables = random_paged_cache([c for c, _ in STEP], kv_heads, dim, bs, dtype, "cpu", _g(9))
    meta = _step_meta(STEP, tables, bs)
    tokens = sum(n for _, n in STEP)
    q, k, v = (_rand(tokens, h, dim, dtype=dtype, seed=s) for h, s in ((heads, 10), (kv_heads, 11), (kv_heads, 12)))
    backend = TorchAttentionBackend()
    c_got, c_want = cache.clone(), cache.clone()
    got = backend.forward(q, k, v, c_got, meta, 0.125, window, cap, lse)
    monkeypatch.setenv("SHARDSERVE_CPU_KERNELS", "0")
    want = backend.forward(q, k, v, c_want, meta, 0.125, window, cap, lse)
    assert torch.equal(c_got, c_want)  # the same slots written
    tol = 2e-5 if dtype == torch.float32 else 2 ** -7
    for a, b in zip(got if lse else (got,), want if lse else (want,)):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_paged_attention_refuses_block_ids_and_row_ranges_outside_the_cache_or_batch():
    cache, tables = random_paged_cache([5], 1, 16, 4, torch.float32, "cpu", _g(0))
    q, out = _rand(1, 2, 16), torch.empty(1, 2, 16)
    one, zero, five = torch.tensor([1]), torch.tensor([0]), torch.tensor([5])
    bad = tables.clone()
    bad[0, 1] = cache.shape[2]  # one past the last block
    with pytest.raises(IndexError, match="outside the KV cache"):
        ops.paged_attention(q, out, cache, bad, five, one, zero, 0.25, None, None, None)
    with pytest.raises(IndexError, match="outside the KV cache"):  # rows 1..1 of a 1-token batch
        ops.paged_attention(q, out, cache, tables, five, one, one, 0.25, None, None, None)
    with pytest.raises(IndexError, match="outside the KV cache"):  # more query rows than context
        ops.paged_attention(q, out, cache, tables, torch.tensor([0]), one, zero, 0.25, None, None, None)
    assert ops.paged_attention(q, out, cache, tables, five, one, zero, 0.25, None, None, None)


def test_a_build_without_a_compiler_is_reported_and_the_layers_fall_back(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    build.load.cache_clear()
    try:
        assert build.load() is None and "failed" in build.unavailable_reason()
        assert not ops.available()
        x, w = _rand(1, 48, seed=1), _rand(24, 48, seed=2)
        assert torch.equal(ops.linear(x, w), F.linear(x, w))  # torch's GEMM
    finally:
        monkeypatch.delenv("CC")
        build.load.cache_clear()
    assert ops.available()



def test_the_portable_build_matches_torch(monkeypatch, tmp_path):
    """Built without -march=native (no AVX-512 or AMX: the code an older x86 or an Arm CPU runs), the kernels still
    give the torch results: a GEMV, a norm and one attention step of decodes and chunked prefills."""
    monkeypatch.setenv("SHARDSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "FLAGS", [f for f in build.FLAGS if f != "-march=native"])
    build.load.cache_clear()
    ops._max_rows.cache_clear()
    try:
        assert build.load() is not None and not build.load().ss_has_avx512() and not ops.amx()
        for dtype in DTYPES:
            x, w = _rand(3, 100, dtype=dtype, seed=1), _rand(37, 100, dtype=dtype, seed=2)
            torch.testing.assert_close(ops.linear(x, w).float(), F.linear(x.double(), w.double()).float(),
                                       rtol=2e-5 if dtype == torch.float32 else 2 ** -7, atol=1e-4)
            norm = RMSNorm(100, 1e-6, dtype)
            norm.weight.data.copy_(_rand(100, dtype=dtype, seed=3))
            torch.testing.assert_close(ops.rms_norm(x, norm.weight, 1e-6), norm.forward_native(x), rtol=2e-6,
                                       atol=2e-6)
        test_paged_attention_and_kv_write_match_the_torch_path(torch.bfloat16, 5, 20.0, True, "gqa", monkeypatch)
        monkeypatch.delenv("SHARDSERVE_CPU_KERNELS")
        test_paged_attention_and_kv_write_match_the_torch_path(torch.float32, None, None, False, "smollm", monkeypatch)
    finally:
        monkeypatch.undo()
        build.load.cache_clear()
        ops._max_rows.cache_clear()
    assert build.load().ss_has_avx512() == ("avx512f" in build.cpu_features())

# --- the fused decode layer ------------------------------------------------------------------------------------
LAYER_CFGS = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
    "smollm_heads": dict(hidden_size=144, intermediate_size=200, num_attention_heads=9, num_key_value_heads=3),
    "qwen3_qk_norm": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=32),
    "qwen2_bias_window": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1,
                              sliding_window=3),
}


def _layer(name: str, dtype: torch.dtype) -> LlamaDecoderLayer:
    cfg = dict(LAYER_CFGS[name], rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=10000.0)
    layer = LlamaDecoderLayer(cfg, ModelShard.whole(1), TorchAttentionBackend(), dtype,
                              qk_norm=name.startswith("qwen3"), qkv_bias=name.startswith("qwen2"), o_bias=False)
    for i, p in enumerate(layer.parameters()):
        p.data.copy_(_rand(*p.shape, dtype=dtype, seed=20 + i, scale=0.2) + (1.0 if p.dim() == 1 else 0.0))
    return layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LAYER_CFGS))
@pytest.mark.parametrize("first", [True, False])
def test_the_fused_decode_layer_equals_the_per_op_layer_bit_for_bit(dtype, name, first):
    layer = _layer(name, dtype)
    assert supports(layer)
    a = layer.self_attn
    lens = [9, 1, 30]
    cache, tables = random_paged_cache(lens, a.num_kv_heads, a.head_dim, 4, dtype, "cpu", _g(3))
    meta = _step_meta([(n, 1) for n in lens], tables, 4)
    hidden = layer.input_layernorm.weight.shape[0]
    x, res = _rand(3, hidden, dtype=dtype, seed=30), (None if first else _rand(3, hidden, dtype=dtype, seed=31))
    positions = torch.tensor([n - 1 for n in lens])
    assert usable(x, meta)
    c_fused, c_ops = cache.clone(), cache.clone()
    with torch.inference_mode():
        got = FusedDecodeLayer(layer)(positions, x, res, c_fused, meta)
        layer._fused = None  # the per-op path from here on
        want = layer(positions, x, res, c_ops, meta)
    assert torch.equal(c_fused, c_ops)
    assert torch.equal(got[1], want[1])  # the residual
    assert torch.equal(got[0], want[0])
    if res is not None:
        assert torch.equal(res, _rand(3, hidden, dtype=dtype, seed=31))  # the caller's residual is not written


def test_the_fused_layer_is_taken_only_for_small_pure_decode_steps(monkeypatch):
    x = _rand(3, 64)
    cache, tables = random_paged_cache([4, 5, 6], 2, 16, 4, torch.float32, "cpu", _g(0))
    meta = _step_meta([(4, 1), (5, 1), (6, 1)], tables, 4)
    assert usable(x, meta)
    mixed = AttentionMetadata(meta.slot_mapping, tables, [4, 5, 6], [1, 1, 1], meta.seq_lens_tensor, 2, 4)
    assert not usable(x, mixed)  # a prefill in the step
    big = _rand(ops.linear_max_rows(torch.float32, 64) + 1, 64)
    many = AttentionMetadata(meta.slot_mapping, tables, [4] * big.shape[0], [1] * big.shape[0],
                             meta.seq_lens_tensor, big.shape[0], 4)
    assert not usable(big, many)  # torch's GEMM is faster there
    assert not usable(x.half(), meta)
    monkeypatch.setenv("SHARDSERVE_FUSED_KERNELS", "1")  # Triton forced: the C kernels stay out
    assert not usable(x, meta)
    monkeypatch.setenv("SHARDSERVE_FUSED_KERNELS", "auto")
    monkeypatch.setenv("SHARDSERVE_CPU_KERNELS", "0")
    assert not usable(x, meta)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["llama", "qwen3_qk_norm", "qwen2_bias_window"])
def test_the_one_call_decode_stack_equals_the_per_op_model_bit_for_bit(dtype, name):
    from shardserve.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
    cls = {"llama": LlamaForCausalLM, "qwen3_qk_norm": Qwen3ForCausalLM, "qwen2_bias_window": Qwen2ForCausalLM}[name]
    cfg = dict(LAYER_CFGS[name], rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=10000.0,
               num_hidden_layers=3, vocab_size=120, attention_bias=name.startswith("qwen2"))
    model = cls(cfg, ModelShard.whole(3), TorchAttentionBackend(), dtype)
    for i, p in enumerate(model.parameters()):
        p.data.copy_(_rand(*p.shape, dtype=dtype, seed=40 + i, scale=0.2) + (1.0 if p.dim() == 1 else 0.0))
    a = model.model.layers[0].self_attn
    lens = [9, 1, 30, 4]
    caches, tables = zip(*(random_paged_cache(lens, a.num_kv_heads, a.head_dim, 4, dtype, "cpu", _g(50 + j))
                           for j in range(3)))
    meta = _step_meta([(n, 1) for n in lens], tables[0], 4)
    ids, positions = torch.tensor([5, 17, 99, 3]), torch.tensor([n - 1 for n in lens])
    stack_caches, op_caches = [c.clone() for c in caches], [c.clone() for c in caches]
    with torch.inference_mode():
        got = model(ids, positions, stack_caches, meta)
        assert model._decode_stack not in (None, False)  # the one-call path was taken
        model._decode_stack = None
        for layer in model.model.layers:
            layer._fused = None
        want = model(ids, positions, op_caches, meta)
    assert all(torch.equal(s, o) for s, o in zip(stack_caches, op_caches))
    assert torch.equal(got, want)


# --- --dtype auto on a CPU -------------------------------------------------------------------------------------------
def test_cpu_auto_dtype_is_bf16_only_with_native_bf16_and_the_kernels():
    from shardserve.layers.cpu.auto_dtype import cpu_auto_dtype, native_bf16_flag
    x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n"
    old_x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"
    assert native_bf16_flag(x86) == "avx512_bf16" and native_bf16_flag(arm) == "bf16"
    assert native_bf16_flag(old_x86) is None
    assert cpu_auto_dtype(x86, kernels=True)[0] == torch.bfloat16
    assert cpu_auto_dtype(arm, kernels=True)[0] == torch.bfloat16
    dtype, why = cpu_auto_dtype(old_x86, kernels=True)
    assert dtype == torch.float32 and "no native bf16" in why
    dtype, why = cpu_auto_dtype(x86, kernels=False)
    assert dtype == torch.float32 and "did not build" in why


def test_engine_args_resolve_auto_on_cpu_and_keep_an_explicit_dtype(caplog):
    from shardserve.engine.args import EngineArgs
    from shardserve.layers.cpu.auto_dtype import cpu_auto_dtype
    with caplog.at_level("WARNING"):
        got = EngineArgs(dtype="auto").resolve_dtype("cpu")
    assert got == cpu_auto_dtype()[0] and "--dtype auto on CPU" in caplog.text
    assert EngineArgs(dtype="float32").resolve_dtype("cpu") == "float32"
    assert EngineArgs(dtype="auto").resolve_dtype("cuda") == "auto"  # the checkpoint's dtype on GPU
