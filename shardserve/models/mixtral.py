"""MoE causal LMs on the Llama stack (`MoEForCausalLM`: sparse MoE blocks, expert-aware loading) and Mixtral."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

import torch
from torch import nn

from shardserve.layers.attention import AttentionBackend
from shardserve.layers.lazy_tensor import LazyTensor
from shardserve.layers.moe import FusedMoE, SparseMoeBlock, local_experts, parse_expert_weight
from shardserve.models.base import ModelShard, PPMissingLayer
from shardserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM


def num_experts(cfg: dict[str, Any]) -> int:
    """Routed experts per MoE layer (`num_local_experts` in Mixtral, `num_experts` in Qwen; transformers 5 also
    writes `num_local_experts` for Qwen3-MoE)."""
    return int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)


class MoEForCausalLM(LlamaForCausalLM):
    """A Llama-style model whose sparse layers replace the dense MLP with a `SparseMoeBlock` named `mlp`.

    Subclasses say which layers are sparse (`is_sparse_layer`), how top-k weights are renormalised
    (`renormalize`) and may add a shared expert (`make_moe_block`). Attention, norms, embeddings, head, forward
    and the non-expert loading are Llama's.
    """
    moe_prefix_aliases: tuple[str, ...] = ()  # checkpoint module names that mean `.mlp.` (Mixtral: block_sparse_moe)

    def __init__(self, cfg: dict[str, Any], shard: ModelShard, backend: AttentionBackend, dtype: torch.dtype) -> None:
        cfg = self.normalize_config(cfg)
        # Llama builds embeddings, final norm and head; an empty layer range makes it build no decoder layer
        # (every slot a placeholder), so no dense MLP is allocated only to be thrown away.
        super().__init__(cfg, replace(shard, start_layer=0, end_layer=0), backend, dtype)
        self.shard = shard
        qkv_bias = bool(cfg.get("attention_bias", self.qkv_bias_default))
        o_bias = qkv_bias and self.o_bias_follows_qkv
        self.model.layers = nn.ModuleList(
            self._make_layer(cfg, shard, backend, dtype, i, qkv_bias, o_bias)
            if shard.start_layer <= i < shard.end_layer else PPMissingLayer()
            for i in range(cfg["num_hidden_layers"]))
        self.num_experts = num_experts(cfg)
        ep = shard.ep if shard.ep is not None and shard.ep.world_size > 1 else None
        self._owned = set(local_experts(self.num_experts, ep.world_size, ep.rank_in_group, shard.expert_placement)
                          if ep is not None else range(self.num_experts))

    # --- hooks --------------------------------------------------------------------------------------------------
    def normalize_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return cfg

    def is_sparse_layer(self, cfg: dict[str, Any], layer_idx: int) -> bool:
        return True

    def renormalize(self, cfg: dict[str, Any]) -> bool:
        return bool(cfg.get("norm_topk_prob", False))

    def make_moe_block(self, cfg: dict[str, Any], shard: ModelShard, dtype: torch.dtype, layer_idx: int) -> nn.Module:
        return SparseMoeBlock(self.make_experts(cfg, shard, dtype, layer_idx), dtype)

    def make_experts(self, cfg: dict[str, Any], shard: ModelShard, dtype: torch.dtype, layer_idx: int) -> FusedMoE:
        inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        return FusedMoE(num_experts(cfg), cfg["num_experts_per_tok"], cfg["hidden_size"], inter,
                        self.renormalize(cfg), shard, dtype, cfg.get("hidden_act", "silu"), layer_idx)

    def _make_layer(self, cfg: dict[str, Any], shard: ModelShard, backend: AttentionBackend, dtype: torch.dtype,
                    layer_idx: int, qkv_bias: bool, o_bias: bool) -> nn.Module:
        if not self.is_sparse_layer(cfg, layer_idx):
            return LlamaDecoderLayer(cfg, shard, backend, dtype, self.qk_norm, qkv_bias, o_bias)
        # a Llama layer with a one-unit dense MLP placeholder, swapped for the MoE block (forward is Llama's)
        layer = LlamaDecoderLayer({**cfg, "intermediate_size": shard.tp.world_size if shard.tp else 1},
                                  shard, backend, dtype, self.qk_norm, qkv_bias, o_bias)
        layer.mlp = self.make_moe_block(cfg, shard, dtype, layer_idx)
        return layer

    # --- loading ------------------------------------------------------------------------------------------------
    def _canonical(self, name: str) -> str:
        for alias in self.moe_prefix_aliases:
            name = name.replace(f".{alias}.", ".mlp.")
        return name

    def wants(self, name: str) -> bool:
        """Llama's rule, plus: under expert parallelism a rank never reads another rank's experts."""
        if not super().wants(name):
            return False
        w = parse_expert_weight(self._canonical(name))
        return w is None or w.expert is None or w.expert in self._owned

    def load_weights(self, weights: Iterable[tuple[str, LazyTensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        for m in self.modules():
            if isinstance(m, FusedMoE):
                m.check_loaded()
        return loaded

    def _load_one(self, params: dict[str, nn.Parameter], name: str, tensor: LazyTensor) -> str:
        name = self._canonical(name)
        w = parse_expert_weight(name)
        if w is None:
            return super()._load_one(params, name, tensor)
        try:
            experts = self.get_submodule(w.module)
        except AttributeError:
            experts = None
        if not isinstance(experts, FusedMoE):
            raise ValueError(f"unexpected checkpoint tensor {name!r} for {type(self).__name__}")
        if w.expert is None:
            return f"{w.module}.{experts.load_fused(tensor, w.shard_id)}"
        return f"{w.module}.{experts.load_expert(tensor, w.shard_id, w.expert)}"


class MixtralForCausalLM(MoEForCausalLM):
    """Mixtral: every layer sparse, softmax → top-k → renormalised; experts stored as
    `block_sparse_moe.experts.{e}.w1/w3/w2` (gate/up/down) on disk, `mlp.experts.gate_up_proj` in transformers 5."""
    moe_prefix_aliases = ("block_sparse_moe",)

    def renormalize(self, cfg: dict[str, Any]) -> bool:
        return True
