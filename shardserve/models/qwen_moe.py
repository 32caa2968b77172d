"""Qwen2-MoE (gated shared expert, q/k/v bias, dense layers) and Qwen3-MoE (q/k norm) on the MoE model base."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shardserve.layers.moe import SparseMoeBlock
from shardserve.models.base import ModelShard
from shardserve.models.llama import LlamaMLP
from shardserve.models.mixtral import MoEForCausalLM, num_experts


class Qwen2MoeForCausalLM(MoEForCausalLM):
    """Layer i is sparse when it is not in `mlp_only_layers` and (i + 1) % decoder_sparse_step == 0; top-k
    weights are renormalised only with `norm_topk_prob`; the shared expert (a dense MLP of
    `shared_expert_intermediate_size`, tensor-parallel in both expert layouts) is scaled by sigmoid(gate(x))."""
    qkv_bias_default = True
    o_bias_follows_qkv = False  # q/k/v carry a bias, o_proj does not

    def normalize_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return {**cfg, "attention_bias": bool(cfg.get("qkv_bias", cfg.get("attention_bias", True)))}

    def is_sparse_layer(self, cfg: dict[str, Any], layer_idx: int) -> bool:
        step = int(cfg.get("decoder_sparse_step") or 1)
        return (layer_idx not in (cfg.get("mlp_only_layers") or []) and num_experts(cfg) > 0
                and (layer_idx + 1) % step == 0)

    def make_moe_block(self, cfg: dict[str, Any], shard: ModelShard, dtype: torch.dtype, layer_idx: int) -> nn.Module:
        experts = self.make_experts(cfg, shard, dtype, layer_idx)
        shared_size = int(cfg.get("shared_expert_intermediate_size") or 0)
        if not shared_size:
            return SparseMoeBlock(experts, dtype)
        shared = LlamaMLP({**cfg, "intermediate_size": shared_size}, shard, dtype)
        shared.down_proj.reduce_results = False  # summed with the experts' partials in the block's one all-reduce
        return SparseMoeBlock(experts, dtype, shared_expert=shared, shared_expert_gate=True)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    """Qwen3-MoE: q/k RMSNorm per head, `attention_bias` (default off) on q/k/v/o, no shared expert."""
    qk_norm = True
    qkv_bias_default = False
    o_bias_follows_qkv = True

    def normalize_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return cfg
