"""MoE layer: routing, grouped expert compute against a token-by-token reference on hand-made routings (an expert
with no token, one with every token), TP-expert and EP partial outputs that sum to the whole layer, loading of
per-expert and fused checkpoint tensors, which expert tensors each EP rank reads, expert counts, refused layouts, and
one 2-rank expert-parallel check over gloo."""
from __future__ import annotations

import pytest
import torch

from shardserve.layers.lazy_tensor import LazyTensor
from shardserve.layers.moe import (ExpertWeight, FusedMoE, SparseMoeBlock, collect_expert_counts,
                                   grouped_expert_forward, local_experts, parse_expert_weight, reset_expert_counts,
                                   select_experts)
from shardserve.models.base import ModelShard

H, I, E, K = 16, 12, 4, 2


class FakeGroup:
    """Rank `rank_in_group` of a group of `world_size`, for building layers in one process (no collectives)."""

    def __init__(self, world_size: int, rank_in_group: int) -> None:
        self.world_size, self.rank_in_group = world_size, rank_in_group


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(E, I, H, generator=g), "w3": torch.randn(E, I, H, generator=g),
            "w2": torch.randn(E, H, I, generator=g) * 0.3}


def _layer(w: dict[str, torch.Tensor], shard: ModelShard, renormalize: bool = True) -> FusedMoE:
    m = FusedMoE(E, K, H, I, renormalize, shard, torch.float32)
    for e in m.owned:
        for sid in ("w1", "w3", "w2"):
            m.load_expert(LazyTensor.wrap(w[sid][e]), sid, e)
    m.check_loaded()
    return m


def _reference(x, w, topk_w, topk_ids) -> torch.Tensor:
    """Token by token, expert by expert: sum_k weight_k * down(silu(gate x) * up x)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            h = torch.nn.functional.silu(w["w1"][e] @ x[t]) * (w["w3"][e] @ x[t])
            out[t] += topk_w[t, k] * (w["w2"][e] @ h)
    return out


# expert 0 receives every token, expert 3 none; expert 1 and 2 share the rest
ROUTING = torch.tensor([[0, 1], [2, 0], [0, 2], [1, 0], [0, 1], [0, 2]])
ROUTE_W = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.55, 0.45]])


def test_select_experts_softmax_topk_and_renormalisation():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.0]])
    w, ids = select_experts(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == [[1, 2], [2, 3]]
    assert torch.allclose(w, probs.gather(1, ids))
    w_norm, ids_norm = select_experts(logits, 2, renormalize=True)
    assert torch.equal(ids_norm, ids)
    assert torch.allclose(w_norm, w / w.sum(-1, keepdim=True)) and torch.allclose(w_norm.sum(-1), torch.ones(2))


def test_grouped_compute_matches_token_by_token_with_empty_and_full_experts():
    w = _weights()
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(1))
    m = _layer(w, ModelShard.whole(1))
    got = m.apply_routing(x, ROUTE_W, ROUTING)
    assert torch.allclose(got, _reference(x, w, ROUTE_W, ROUTING), atol=1e-5)
    assert m.expert_counts.tolist() == [6, 3, 3, 0]
    assert sum(collect_expert_counts(m)[0]) == 6 * K
    reset_expert_counts(m)
    assert m.expert_counts.tolist() == [0] * E


def test_no_local_token_gives_zeros():
    w = _weights()
    x = torch.randn(3, H)
    out = grouped_expert_forward(x, torch.stack([w["w1"][0], w["w3"][0]], 1).reshape(1, 2 * I, H),
                                 w["w2"][:1], torch.ones(3, 2), torch.full((3, 2), -1), torch.nn.SiLU())
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("layout", ["tp", "ep:linear", "ep:round_robin"])
def test_rank_partials_sum_to_the_whole_layer(layout):
    """Dispatch/combine without processes: each rank's partial output (its expert slices or its whole experts on
    the tokens routed to them) summed over ranks — what the all-reduce computes — equals the single-rank layer."""
    w = _weights()
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(2))
    whole = _layer(w, ModelShard.whole(1)).apply_routing(x, ROUTE_W, ROUTING)
    parts, owned = [], []
    for r in range(2):
        g = FakeGroup(2, r)
        placement = layout.split(":")[-1] if layout != "tp" else "linear"
        m = _layer(w, ModelShard(tp=g, start_layer=0, end_layer=1, ep=g if layout != "tp" else None,
                                 expert_placement=placement))
        parts.append(m.apply_routing(x, ROUTE_W, ROUTING))
        owned.append(m.owned)
        assert m.expert_counts.tolist() == [6, 3, 3, 0]  # every rank counts every token: counts are global
    assert torch.allclose(parts[0] + parts[1], whole, atol=1e-5)
    if layout == "ep:linear":
        assert owned == [[0, 1], [2, 3]]
    elif layout == "ep:round_robin":
        assert owned == [[0, 2], [1, 3]]


def test_placements():
    assert local_experts(8, 4, 1, "linear") == [2, 3]
    assert local_experts(8, 4, 1, "round_robin") == [1, 5]
    with pytest.raises(ValueError, match="not divisible"):
        local_experts(6, 4, 0)


def test_fused_and_per_expert_checkpoint_forms_load_the_same():
    w = _weights()
    gate_up = torch.cat([w["w1"], w["w3"]], dim=1)  # [E, 2I, H]: transformers 5's in-memory form
    for layout in ("tp", "ep"):
        for r in range(2):
            g = FakeGroup(2, r)
            shard = ModelShard(tp=g, start_layer=0, end_layer=1, ep=g if layout == "ep" else None)
            a = _layer(w, shard)
            b = FusedMoE(E, K, H, I, True, shard, torch.float32)
            b.load_fused(LazyTensor.wrap(gate_up), "w13")
            b.load_fused(LazyTensor.wrap(w["w2"]), "w2")
            b.check_loaded()
            assert torch.equal(a.w13_weight, b.w13_weight) and torch.equal(a.w2_weight, b.w2_weight)


def test_missing_expert_weights_are_reported():
    m = FusedMoE(E, K, H, I, True, ModelShard.whole(1), torch.float32)
    with pytest.raises(ValueError, match="missing expert weights"):
        m.check_loaded()


def test_parse_expert_weight_names():
    p = parse_expert_weight
    assert p("model.layers.3.block_sparse_moe.experts.5.w3.weight").shard_id == "w3"
    assert p("model.layers.3.mlp.experts.5.down_proj.weight") == ExpertWeight("model.layers.3.mlp.experts", 5, "w2")
    assert p("model.layers.0.mlp.experts.gate_up_proj").expert is None
    assert p("model.layers.0.mlp.shared_expert.gate_proj.weight") is None
    assert p("model.layers.0.mlp.gate.weight") is None


def _model(arch: str, cfg: dict, shard: ModelShard):
    from shardserve.layers.attention.torch_backend import TorchAttentionBackend
    from shardserve.models.registry import get_model_class
    return get_model_class(arch)(cfg, shard, TorchAttentionBackend(), torch.float32)


QWEN2 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
             shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[2], qkv_bias=True)


def test_sparse_layers_and_expert_wants_under_ep():
    g = FakeGroup(2, 1)
    model = _model("Qwen2MoeForCausalLM", QWEN2, ModelShard(tp=g, start_layer=0, end_layer=4, ep=g,
                                                            expert_placement="round_robin"))
    sparse = [isinstance(layer.mlp, SparseMoeBlock) for layer in model.model.layers]
    assert sparse == [True, True, False, True]  # mlp_only_layers=[2]
    assert model.model.layers[0].mlp.experts.owned == [1, 3, 5, 7]
    assert model.wants("model.layers.0.mlp.experts.3.gate_proj.weight")
    assert not model.wants("model.layers.0.mlp.experts.2.gate_proj.weight")  # another rank's expert: never read
    assert model.wants("model.layers.0.mlp.experts.gate_up_proj")  # fused: narrowed to the owned experts
    assert model.wants("model.layers.0.mlp.shared_expert.gate_proj.weight")
    step2 = _model("Qwen2MoeForCausalLM", {**QWEN2, "decoder_sparse_step": 2, "mlp_only_layers": []},
                   ModelShard.whole(4))
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in step2.model.layers] == [False, True, False, True]


def test_impossible_layouts_are_refused():
    from shardserve.config import ConfigError, ModelConfig, ParallelConfig, validate_layout
    cfg = ModelConfig(model="m", dtype=torch.float32, hf_config={**QWEN2, "num_experts": 6}, max_model_len=64,
                      tokenizer="m")
    with pytest.raises(ConfigError, match="not divisible by the expert-parallel size 4"):
        validate_layout(cfg, ParallelConfig(tensor_parallel_size=4, enable_expert_parallel=True), "cpu")
    g = FakeGroup(4, 0)
    with pytest.raises(ValueError, match="intermediate size"):  # TP experts: 12 / 8 does not divide
        FusedMoE(8, 2, H, 12, True, ModelShard(tp=FakeGroup(8, 0), start_layer=0, end_layer=1), torch.float32)
    with pytest.raises(ValueError, match="not divisible"):
        FusedMoE(6, 2, H, I, True, ModelShard(tp=g, start_layer=0, end_layer=1, ep=g), torch.float32)


# ------------------------------------------------------------------------------------------------ 2 ranks, gloo

def _ep_body(rank: int, world_size: int, placement: str) -> dict:
    from shardserve.distributed.parallel_state import build_parallel_state
    state = build_parallel_state(tp_size=world_size)
    shard = ModelShard(tp=state.tp, start_layer=0, end_layer=1, ep=state.ep, expert_placement=placement)
    w = _weights()
    block = SparseMoeBlock(_layer(w, shard), torch.float32)
    block.gate.weight.data.copy_(torch.randn(E, H, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(10, H, generator=torch.Generator().manual_seed(4))
    out = block(x)  # router on every rank, own experts, one all-reduce
    return {"out": out, "owned": block.experts.owned, "counts": block.experts.expert_counts}


@pytest.mark.slow
@pytest.mark.xdist_group("multiproc")
def test_two_rank_expert_parallel_block_matches_single_rank():
    from dist.launcher import run_ranks
    results = run_ranks(_ep_body, 2, "round_robin", timeout=60)
    w = _weights()
    block = SparseMoeBlock(_layer(w, ModelShard.whole(1)), torch.float32)
    block.gate.weight.data.copy_(torch.randn(E, H, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(10, H, generator=torch.Generator().manual_seed(4))
    want = block(x)
    assert [r["owned"] for r in results] == [[0, 2], [1, 3]]
    for r in results:
        assert torch.allclose(r["out"], want, atol=1e-5)
        assert torch.equal(r["counts"], block.experts.expert_counts) and int(r["counts"].sum()) == 10 * K
