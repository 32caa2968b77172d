"""The Llama family (Llama 2/3, Mistral, Qwen2 with QKV bias, Qwen3 with per-head q/k RMSNorm) built from
tensor-parallel layers; a pipeline stage builds only its own layers."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from shardserve.layers.activation import get_act_fn
from shardserve.layers.attention import Attention, AttentionBackend, AttentionMetadata
from shardserve.layers.cpu.decode_layer import FusedDecodeLayer, FusedDecodeStack
from shardserve.layers.cpu.decode_layer import supports as supports_fused, usable as fused_usable
from shardserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardserve.layers.lazy_tensor import LazyTensor
from shardserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from shardserve.layers.norm import RMSNorm
from shardserve.layers.rotary import RotaryEmbedding, rope_parameters
from shardserve.models.base import ModelShard, PPMissingLayer, IntermediateTensors


class LlamaAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any], shard: ModelShard, backend: AttentionBackend, dtype: torch.dtype,
                 qk_norm: bool, bias: bool, o_bias: bool) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        self.head_dim = cfg.get("head_dim") or hidden // heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, heads, kv_heads, bias=bias, dtype=dtype, tp=shard.tp)
        # this rank's heads (tp_split.head_partition: by KV group, possibly uneven); o_proj reads the same q slice
        self.o_proj = RowParallelLinear(heads * self.head_dim, hidden, bias=o_bias,
                                        dtype=dtype, tp=shard.tp, input_shard=self.qkv_proj.q_range)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.rotary_emb = RotaryEmbedding(self.head_dim, cfg.get("max_position_embeddings", 2048),
                                          rope_parameters(cfg))
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.q_norm = RMSNorm(self.head_dim, eps, dtype) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps, dtype) if qk_norm else None
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        self.attn = Attention(self.num_heads, self.head_dim, backend, self.num_kv_heads, sliding_window=window,
                              logits_soft_cap=cfg.get("attn_logit_softcapping"))  # scale: head_dim ** -0.5

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [tokens, (heads + 2 * kv_heads) * dim]
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [tokens, heads, dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [tokens, kv_heads, dim]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        o = self.attn(q, k, v, kv_cache, meta)  # [tokens, heads * dim]
        return self.o_proj(o)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: dict[str, Any], shard: ModelShard, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        bias = bool(cfg.get("mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias=bias, dtype=dtype, tp=shard.tp)
        self.down_proj = RowParallelLinear(inter, hidden, bias=bias, dtype=dtype, tp=shard.tp)
        self.act_fn = get_act_fn(cfg.get("hidden_act", "silu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any], shard: ModelShard, backend: AttentionBackend, dtype: torch.dtype,
                 qk_norm: bool, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = LlamaAttention(cfg, shard, backend, dtype, qk_norm, qkv_bias, o_bias)
        self.mlp = LlamaMLP(cfg, shard, dtype)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps, dtype)
        self._fused: FusedDecodeLayer | None | bool = False  # False: not decided yet; None: not supported

    def forward(self, positions, x, residual, kv_cache, meta):
        if self._fused is False:
            self._fused = FusedDecodeLayer(self) if supports_fused(self) else None
        if self._fused is not None and kv_cache.dtype == x.dtype and fused_usable(x, meta):
            return self._fused(positions, x, residual, kv_cache, meta)
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Llama-style causal LM. `forward` runs this stage's layers; `compute_logits` runs the (last stage's) head."""
    qk_norm = False
    qkv_bias_default = False
    o_bias_follows_qkv = True  # Llama/Mistral/Qwen3: attention_bias covers o_proj too; Qwen2: q/k/v only

    def __init__(self, cfg: dict[str, Any], shard: ModelShard, backend: AttentionBackend, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg, self.shard = cfg, shard
        qkv_bias = bool(cfg.get("attention_bias", self.qkv_bias_default))
        o_bias = qkv_bias and self.o_bias_follows_qkv
        hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(vocab, hidden, dtype, shard.tp) \
            if shard.is_first_stage else PPMissingLayer()
        self.model.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, shard, backend, dtype, self.qk_norm, qkv_bias, o_bias)
            if shard.start_layer <= i < shard.end_layer else PPMissingLayer()
            for i in range(cfg["num_hidden_layers"]))
        self.model.norm = RMSNorm(hidden, cfg.get("rms_norm_eps", 1e-6), dtype) \
            if shard.is_last_stage else PPMissingLayer()
        if shard.is_last_stage:
            self.lm_head = ParallelLMHead(vocab, hidden, dtype, shard.tp)
            if self.tie_word_embeddings and shard.is_first_stage:
                self.lm_head.tie_to(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self._decode_stack: FusedDecodeStack | None | bool = False  # False: not built yet; None: not supported

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, intermediate: IntermediateTensors | None = None):
        """input_ids/positions [tokens]; kv_caches one per local layer. Returns the final hidden states
        [tokens, hidden] on the last stage, else {"hidden_states", "residual"} for the next stage."""
        if self.shard.is_first_stage:
            x, residual = self.model.embed_tokens(input_ids), None
        else:
            x, residual = intermediate["hidden_states"], intermediate["residual"]
        stack = self._decode_stack_for(x, kv_caches, meta)
        if stack is not None:  # a pure-decode step on CPU: all layers in one C call (layers/cpu/decode_layer.py)
            x, residual = stack(positions, x, residual, kv_caches, meta)
        else:
            for j, i in enumerate(range(self.shard.start_layer, self.shard.end_layer)):
                x, residual = self.model.layers[i](positions, x, residual, kv_caches[j], meta)
        if not self.shard.is_last_stage:
            return {"hidden_states": x, "residual": residual}
        if residual is None:  # a last stage that holds no decoder layer
            return self.model.norm(x)
        x, _ = self.model.norm(x, residual)
        return x

    def _decode_stack_for(self, x: torch.Tensor, kv_caches: list[torch.Tensor],
                          meta: AttentionMetadata) -> FusedDecodeStack | None:
        if self._decode_stack is False:
            layers = [self.model.layers[i] for i in range(self.shard.start_layer, self.shard.end_layer)]
            self._decode_stack = FusedDecodeStack([FusedDecodeLayer(layer) for layer in layers]) \
                if FusedDecodeStack.supports(layers) else None
        if self._decode_stack is None or not fused_usable(x, meta) or kv_caches[0].dtype != x.dtype:
            return None
        return self._decode_stack

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [tokens, vocab]

    # --- loading -------------------------------------------------------------------------------------------
    _stacked = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
                ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))

    def wants(self, name: str) -> bool:
        """Whether this stage keeps checkpoint tensor `name` (so the loader never reads the rest)."""
        if "rotary_emb.inv_freq" in name:
            return False
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            return self.shard.start_layer <= i < self.shard.end_layer
        if name.startswith("model.embed_tokens."):
            return self.shard.is_first_stage or (self.tie_word_embeddings and self.shard.is_last_stage)
        if name.startswith("model.norm."):
            return self.shard.is_last_stage
        if name.startswith("lm_head."):
            return self.shard.is_last_stage and not self.tie_word_embeddings
        return True

    def load_weights(self, weights: Iterable[tuple[str, LazyTensor]]) -> set[str]:
        self._decode_stack = False  # rebuilt from the new weights at the next decode step
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if not self.wants(name):
                continue
            if name.startswith("model.embed_tokens.") and self.tie_word_embeddings and self.shard.is_last_stage:
                # one shared parameter on a single stage; a separate copy on the last of several stages
                name = "model.embed_tokens.weight" if self.shard.is_first_stage else "lm_head.weight"
                loaded.add("lm_head.weight")
            loaded.add(self._load_one(params, name, tensor))
        missing = {n for n in params if n not in loaded}
        if missing:
            raise ValueError(f"checkpoint is missing weights for: {sorted(missing)[:8]}")
        return loaded

    def _load_one(self, params: dict[str, nn.Parameter], name: str, tensor: LazyTensor) -> str:
        for fused, part, shard_id in self._stacked:
            if f".{part}." in name:
                fused_name = name.replace(f".{part}.", f".{fused}.")
                param = params[fused_name]
                param.weight_loader(param, tensor, shard_id)
                return fused_name
        if name not in params:
            raise ValueError(f"unexpected checkpoint tensor {name!r} for {type(self).__name__}")
        param = params[name]
        param.weight_loader(param, tensor)
        return name


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias_default = True
    o_bias_follows_qkv = False


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
