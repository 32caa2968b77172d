"""A Llama-style decoder layer's decode step as two C calls (kernels.c: ss_attn_block, ss_mlp_block) instead of ~30
torch ops and module calls: the CPU's counterpart of the captured decode step on GPU.

A batch-1 decode step of a small model spends as long in Python and dispatch between the per-token ops as in its
GEMVs (docs/benchmarks.md). The blocks run the very kernels the per-op path runs, in the same order and with the
same roundings, so the fused layer's output equals the per-op layer's bit for bit; the tests check both against
each other and against transformers. The tensor-parallel all-reduces (and a row-parallel bias) stay in Python
between and after the blocks.

Taken when every token of the step is a decode, at most ops.linear_max_rows() of them (past that, torch's GEMM beats
the GEMV kernel; 8 in fp32, up to DECODE_MAX_SEQS in bf16 with AMX), on float32/bfloat16 CPU tensors, for layers
built from the standard pieces (TorchAttentionBackend's cache layout, neox rotary, SiLU MLP without bias)."""
from __future__ import annotations

import ctypes

import torch

from shardserve.layers.activation import SiluAndMul
from shardserve.layers.attention.base import AttentionMetadata
from shardserve.layers.attention.torch_backend import TorchAttentionBackend
from shardserve.layers.cpu import build, ops
from shardserve.layers.rotary import RotaryEmbedding

_P, _D, _I = ctypes.c_void_p, ctypes.c_double, ctypes.c_int64
DECODE_MAX_SEQS = 256  # past this a step's C decode attention (one task per sequence and KV head) is not measured


class _AttnWeights(ctypes.Structure):
    _fields_ = [("norm_w", _P), ("eps", _D), ("hidden", _I), ("qkv_w", _P), ("qkv_b", _P), ("heads", _I),
                ("kv_heads", _I), ("head_dim", _I), ("q_norm_w", _P), ("k_norm_w", _P), ("qk_eps", _D),
                ("cos", _P), ("sin", _P), ("max_pos", _I), ("scale", _D), ("window", _I), ("softcap", _D),
                ("o_w", _P), ("o_ldw", _I)]


class _MlpWeights(ctypes.Structure):
    _fields_ = [("norm_w", _P), ("eps", _D), ("hidden", _I), ("inter", _I), ("gate_up_w", _P), ("down_w", _P)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def supports(layer) -> bool:
    """Whether a decoder layer (self_attn, mlp, input_layernorm, post_attention_layernorm) is built from pieces the
    blocks implement."""
    a, m = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if a is None or m is None or not hasattr(m, "gate_up_proj") or not hasattr(a, "qkv_proj"):
        return False
    tensors = [a.qkv_proj.weight, a.o_proj.weight, m.gate_up_proj.weight, m.down_proj.weight,
               layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
    dtype = tensors[0].dtype
    return (dtype in ops.DTYPES and all(t.dtype == dtype and t.is_contiguous() for t in tensors)
            and isinstance(a.attn.backend, TorchAttentionBackend) and type(a.rotary_emb) is RotaryEmbedding
            and isinstance(m.act_fn, SiluAndMul) and m.gate_up_proj.bias is None and m.down_proj.bias is None
            and (a.qkv_proj.bias is None or a.qkv_proj.bias.dtype == dtype)
            and (a.q_norm is None or a.q_norm.weight.dtype == dtype))


def usable(x: torch.Tensor, meta: AttentionMetadata) -> bool:
    """Whether this step (hidden states x [tokens, hidden], meta) can take the fused decode layers."""
    tokens = x.shape[0]
    limit = min(ops.linear_max_rows(x.dtype, x.shape[-1]), DECODE_MAX_SEQS)
    return (meta.num_decodes == tokens == len(meta.seq_lens) and 0 < tokens <= limit
            and x.device.type == "cpu" and ops.fused_on() and ops.handles(x))


class FusedDecodeLayer:
    """Runs one decoder layer's decode step through the two blocks; built per layer, weights re-read when moved."""

    def __init__(self, layer) -> None:
        self.layer = layer
        self._key: tuple | None = None
        self._attn = _AttnWeights()
        self._mlp = _MlpWeights()

    def _refresh(self) -> None:
        layer = self.layer
        a, m = layer.self_attn, layer.mlp
        params = (layer.input_layernorm.weight, a.qkv_proj.weight, a.qkv_proj.bias, a.o_proj.weight,
                  a.q_norm.weight if a.q_norm is not None else None, a.rotary_emb.cos_cache,
                  layer.post_attention_layernorm.weight, m.gate_up_proj.weight, m.down_proj.weight)
        key = tuple(_ptr(p) for p in params)
        if key == self._key:
            return
        rot, attn = a.rotary_emb, a.attn
        self._cos, self._sin = rot.cos_cache.float().contiguous(), rot.sin_cache.float().contiguous()
        self._attn = _AttnWeights(
            norm_w=_ptr(layer.input_layernorm.weight), eps=layer.input_layernorm.eps,
            hidden=layer.input_layernorm.weight.shape[0], qkv_w=_ptr(a.qkv_proj.weight), qkv_b=_ptr(a.qkv_proj.bias),
            heads=a.num_heads, kv_heads=a.num_kv_heads, head_dim=a.head_dim,
            q_norm_w=_ptr(a.q_norm.weight) if a.q_norm is not None else None,
            k_norm_w=_ptr(a.k_norm.weight) if a.k_norm is not None else None,
            qk_eps=a.q_norm.eps if a.q_norm is not None else 0.0, cos=_ptr(self._cos), sin=_ptr(self._sin),
            max_pos=self._cos.shape[0], scale=attn.scale, window=attn.sliding_window or 0,
            softcap=attn.logits_soft_cap or 0.0, o_w=_ptr(a.o_proj.weight), o_ldw=a.o_proj.weight.shape[1])
        self._mlp = _MlpWeights(
            norm_w=_ptr(layer.post_attention_layernorm.weight), eps=layer.post_attention_layernorm.eps,
            hidden=m.down_proj.weight.shape[0], inter=m.down_proj.weight.shape[1],
            gate_up_w=_ptr(m.gate_up_proj.weight), down_w=_ptr(m.down_proj.weight))
        self._key = key

    def __call__(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                 kv_cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's forward for a pure-decode step: (mlp output, residual), as LlamaDecoderLayer.forward."""
        self._refresh()
        lib, dt, threads = build.load(), ops.DTYPES[x.dtype], torch.get_num_threads()
        a, m = self.layer.self_attn, self.layer.mlp
        x = x.contiguous()
        tokens = x.shape[0]
        res = torch.empty_like(x) if residual is None else residual.clone()
        y = torch.empty_like(x)
        blocks, block_size = kv_cache.shape[2], kv_cache.shape[3]
        tables, lens = meta.block_tables, meta.seq_lens_tensor
        bad = lib.ss_attn_block(ctypes.byref(self._attn), dt, x.data_ptr(), res.data_ptr(), residual is not None,
                                y.data_ptr(), kv_cache.data_ptr(), blocks, block_size, positions.data_ptr(),
                                meta.slot_mapping.data_ptr(), tables.data_ptr(), tables.shape[1], lens.data_ptr(),
                                tokens, threads)
        _check(bad)
        y = _reduce_and_bias(a.o_proj, y)
        out = torch.empty_like(x)
        lib.ss_mlp_block(ctypes.byref(self._mlp), dt, y.data_ptr(), res.data_ptr(), out.data_ptr(), tokens, threads)
        return _reduce_and_bias(m.down_proj, out), res


class FusedDecodeStack:
    """A pipeline stage's decoder layers for a pure-decode step in one C call (ss_decode_stack): for tensor
    parallelism off and no row-parallel bias (nothing runs between the blocks). Built lazily from the layers'
    FusedDecodeLayer weights; the model drops it when it loads weights again."""

    def __init__(self, layers: list[FusedDecodeLayer]) -> None:
        for f in layers:
            f._refresh()
        self.layers = layers
        self._attn = (_AttnWeights * len(layers))(*[f._attn for f in layers])
        self._mlp = (_MlpWeights * len(layers))(*[f._mlp for f in layers])
        self._kv_key: tuple | None = None
        self._kv = (ctypes.c_void_p * len(layers))()

    @staticmethod
    def supports(layers) -> bool:
        return bool(layers) and all(
            supports(layer) and layer.self_attn.o_proj.tp_size == 1 and layer.mlp.down_proj.tp_size == 1
            and layer.self_attn.o_proj.bias is None for layer in layers)

    def __call__(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                 kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(c.data_ptr() for c in kv_caches[:len(self.layers)])
        if key != self._kv_key:
            self._kv[:] = key
            self._kv_key = key
        x = x.clone()
        res = torch.empty_like(x) if residual is None else residual.clone()
        cache = kv_caches[0]
        tables, lens = meta.block_tables, meta.seq_lens_tensor
        bad = build.load().ss_decode_stack(
            len(self.layers), self._attn, self._mlp, self._kv, ops.DTYPES[x.dtype], x.data_ptr(), res.data_ptr(),
            residual is not None, cache.shape[2], cache.shape[3], positions.data_ptr(), meta.slot_mapping.data_ptr(),
            tables.data_ptr(), tables.shape[1], lens.data_ptr(), x.shape[0], torch.get_num_threads())
        _check(bad)
        return x, res


def _check(bad: int) -> None:
    if bad:
        raise IndexError(f"{bad} position(s), block id(s) or length(s) out of range in a decode step")


def _reduce_and_bias(proj, y: torch.Tensor) -> torch.Tensor:
    """What RowParallelLinear does after its GEMM: all-reduce over TP ranks, then the bias once."""
    if proj.tp_size > 1 and proj.reduce_results:
        y = proj.tp.all_reduce(y)
    if proj.bias is not None:
        y = y + proj.bias
    return y
