"""layers/tp_split.py: sizes and attention heads over tp ranks when they do not divide (every head assigned exactly
once, query heads only with their KV head, sizes summing to the whole, a refusal only when tp > heads); the layers'
weight loaders built on it (one process, a stand-in group per rank); config validation and the planner's largest
shard."""
from __future__ import annotations

import pytest
import torch

from shardserve.layers.lazy_tensor import LazyTensor
from shardserve.layers.tp_split import (all_head_partitions, check_heads, head_partition, max_heads_per_rank,
                                        max_shard, shard_range, split_sizes)

# (heads, kv heads) of real and awkward models: MHA, GQA, MQA, SmolLM2 (9/3), Qwen2-7B (28/4), Llama-3-8B (32/8)
SHAPES = [(1, 1), (4, 2), (7, 7), (7, 1), (9, 3), (12, 4), (14, 2), (15, 5), (28, 4), (32, 8), (40, 8), (64, 8)]


def test_split_sizes_are_balanced_larger_first_and_sum():
    assert split_sizes(7, 2) == [4, 3]
    assert split_sizes(100, 3) == [34, 33, 33]
    assert split_sizes(101, 4) == [26, 25, 25, 25]
    assert split_sizes(8, 4) == [2, 2, 2, 2]
    for n in range(0, 40):
        for tp in range(1, 10):
            sizes = split_sizes(n, tp)
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            assert max(sizes) == max_shard(n, tp)
            start = 0
            for r, size in enumerate(sizes):  # shard_range: contiguous, in rank order
                assert shard_range(n, tp, r) == (start, size)
                start += size
    with pytest.raises(ValueError):
        split_sizes(4, 0)
    with pytest.raises(ValueError):
        shard_range(4, 2, 2)


def test_the_issue_examples():
    # 9 heads / 3 KV heads at tp 2: one rank gets 2 KV heads with their 6 query heads, the other 1 with 3
    assert all_head_partitions(9, 3, 2) == [(0, 6, 0, 2), (6, 3, 2, 1)]
    assert all_head_partitions(9, 3, 3) == [(0, 3, 0, 1), (3, 3, 1, 1), (6, 3, 2, 1)]
    # tp 4 > 3 KV heads: KV head 0 is replicated on ranks 0 and 1, which split its query heads 2 + 1
    assert all_head_partitions(9, 3, 4) == [(0, 2, 0, 1), (2, 1, 0, 1), (3, 3, 1, 1), (6, 3, 2, 1)]
    assert all_head_partitions(7, 7, 3) == [(0, 3, 0, 3), (3, 2, 3, 2), (5, 2, 5, 2)]
    assert all_head_partitions(7, 1, 2) == [(0, 4, 0, 1), (4, 3, 0, 1)]
    assert max_heads_per_rank(9, 3, 2) == (6, 2) and max_heads_per_rank(9, 3, 4) == (3, 1)


@pytest.mark.parametrize("heads,kv", SHAPES)
def test_every_head_exactly_once_and_only_with_its_kv_head(heads, kv):
    group = heads // kv
    for tp in range(1, heads + 1):
        parts = all_head_partitions(heads, kv, tp)
        q_owner = [[] for _ in range(heads)]
        kv_holders = [[] for _ in range(kv)]
        next_q = 0
        for r, p in enumerate(parts):
            assert p.q_count >= 1 and p.kv_count >= 1
            assert p.q_start == next_q  # contiguous, in rank order: o_proj's row slice is one range
            next_q += p.q_count
            held = range(p.kv_start, p.kv_start + p.kv_count)
            for h in range(p.q_start, p.q_start + p.q_count):
                q_owner[h].append(r)
                assert h // group in held, (heads, kv, tp, r, h)  # a query head only with its KV head
            assert {h // group for h in range(p.q_start, p.q_start + p.q_count)} == set(held)  # no idle KV head
            assert p.q_count % p.kv_count == 0  # what the attention kernels group over
            for g in held:
                kv_holders[g].append(r)
        assert all(len(o) == 1 for o in q_owner), (heads, kv, tp)  # every query head exactly once
        assert all(kv_holders), (heads, kv, tp)  # every KV head somewhere
        if tp <= kv:
            assert all(len(h) == 1 for h in kv_holders)  # partitioned, never replicated
            assert [p.kv_count for p in parts] == split_sizes(kv, tp)
        else:
            assert all(p.kv_count == 1 for p in parts)  # replicated: one per rank
        if heads % tp == 0 and (kv % tp == 0 or tp % kv == 0):  # what divided before: the usual even split
            assert all(p.q_start == r * heads // tp and p.q_count == heads // tp for r, p in enumerate(parts))
        assert max_heads_per_rank(heads, kv, tp) == (max(p.q_count for p in parts), max(p.kv_count for p in parts))


def test_more_ranks_than_query_heads_is_refused_saying_why():
    with pytest.raises(ValueError, match=r"tensor-parallel size 10 exceeds num_attention_heads \(9\).*at most 9"):
        head_partition(9, 3, 10, 0)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        check_heads(6, 4, 2)
    with pytest.raises(ValueError, match="outside"):
        head_partition(9, 3, 2, 2)


# --------------------------------------------------------------------------------------------- layers, one process

class FakeGroup:
    """Rank `rank_in_group` of `world_size`: builds and loads one rank's layers in this process (no collectives)."""

    def __init__(self, world_size: int, rank_in_group: int) -> None:
        self.world_size, self.rank_in_group = world_size, rank_in_group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the test sums the ranks' partial products itself

    def overlap_chunks_for(self, tokens: int) -> int:
        return 1


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_linear_layers_load_uneven_slices_that_add_up(tp):
    from shardserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    g = torch.Generator().manual_seed(0)
    hidden, inter, heads, kv, dim = 24, 101, 9, 3, 4
    x = torch.randn(5, hidden, generator=g)
    gate, up, down = torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g), \
        torch.randn(hidden, inter, generator=g)
    wq, wk, wv = (torch.randn(n * dim, hidden, generator=g) for n in (heads, kv, kv))
    wo = torch.randn(hidden, heads * dim, generator=g)
    mlp_out = torch.zeros(5, hidden)
    attn_out = torch.zeros(5, hidden)
    q_rows, widths = [], []
    for r in range(tp):
        grp = FakeGroup(tp, r)
        gu = MergedColumnParallelLinear(hidden, [inter, inter], tp=grp)
        gu.weight.weight_loader(gu.weight, LazyTensor.wrap(gate), 0)
        gu.weight.weight_loader(gu.weight, LazyTensor.wrap(up), 1)
        dn = RowParallelLinear(inter, hidden, tp=grp)
        dn.weight.weight_loader(dn.weight, LazyTensor.wrap(down))
        start, size = shard_range(inter, tp, r)
        widths.append(size)
        assert torch.equal(gu.weight, torch.cat([gate[start:start + size], up[start:start + size]]))
        h = gu(x)
        mlp_out += dn(h[:, :size] * h[:, size:])  # a stand-in activation over this rank's columns
        qkv = QKVParallelLinear(hidden, dim, heads, kv, tp=grp)
        for name, w in (("q", wq), ("k", wk), ("v", wv)):
            qkv.weight.weight_loader(qkv.weight, LazyTensor.wrap(w), name)
        p = head_partition(heads, kv, tp, r)
        q, k, v = qkv(x).split([qkv.q_size, qkv.kv_size, qkv.kv_size], dim=-1)
        assert torch.allclose(q, x @ wq[p.q_start * dim:(p.q_start + p.q_count) * dim].t(), atol=1e-5)
        assert torch.allclose(k, x @ wk[p.kv_start * dim:(p.kv_start + p.kv_count) * dim].t(), atol=1e-5)
        assert torch.allclose(v, x @ wv[p.kv_start * dim:(p.kv_start + p.kv_count) * dim].t(), atol=1e-5)
        o = RowParallelLinear(heads * dim, hidden, tp=grp, input_shard=qkv.q_range)
        o.weight.weight_loader(o.weight, LazyTensor.wrap(wo))
        attn_out += o(q)
        q_rows.append(q)
    assert widths == split_sizes(inter, tp)
    full_h = torch.cat([x @ gate.t(), x @ up.t()], dim=-1)
    assert torch.allclose(mlp_out, (full_h[:, :inter] * full_h[:, inter:]) @ down.t(), atol=1e-3)
    assert torch.allclose(torch.cat(q_rows, dim=-1), x @ wq.t(), atol=1e-5)
    assert torch.allclose(attn_out, (x @ wq.t()) @ wo.t(), atol=1e-3)


# --------------------------------------------------------------------------------------------- config and planner

def _model_config(heads: int, kv: int, inter: int = 1536):
    from shardserve.config import ModelConfig
    hf = dict(num_attention_heads=heads, num_key_value_heads=kv, hidden_size=heads * 16, intermediate_size=inter,
              num_hidden_layers=4, vocab_size=49152, max_position_embeddings=64)
    return ModelConfig(model="m", dtype=torch.float32, hf_config=hf, max_model_len=64, tokenizer="m")


def test_config_accepts_any_tp_up_to_the_heads_and_sizes_kv_for_the_largest_shard():
    from shardserve.config import ConfigError, ParallelConfig, validate_layout
    cfg = _model_config(9, 3)
    for tp in range(1, 10):
        validate_layout(cfg, ParallelConfig(tensor_parallel_size=tp), "cpu")
    with pytest.raises(ConfigError, match=r"--tensor-parallel-size 10: .*exceeds num_attention_heads \(9\).*at most 9"):
        validate_layout(cfg, ParallelConfig(tensor_parallel_size=10), "cpu")
    with pytest.raises(ConfigError, match=r"intermediate_size \(3\).*at most 3"):
        validate_layout(_model_config(9, 3, inter=3), ParallelConfig(tensor_parallel_size=4), "cpu")
    per_head = 2 * 4 * 16 * 4  # K and V, 4 layers, head_dim 16, fp32
    assert cfg.kv_bytes_per_token(2) == 2 * per_head  # the rank with 2 KV heads
    assert [cfg.kv_bytes_per_token(2, tp_rank=r) for r in range(2)] == [2 * per_head, per_head]
    assert cfg.kv_bytes_per_token(4) == per_head


def test_planner_sizes_the_largest_shard():
    from shardserve.planner.memory import (ModelSpec, activation_bytes, heads_per_device, kv_heads_per_device,
                                           stage_weights)
    config = dict(model_type="llama", hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                  intermediate_size=1536, num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True,
                  max_position_embeddings=8192)
    spec = ModelSpec.from_config(config, "SmolLM2-135M")
    assert [heads_per_device(spec, tp) for tp in (1, 2, 3, 4)] == [9, 6, 3, 3]
    assert [kv_heads_per_device(spec, tp) for tp in (1, 2, 3, 4)] == [3, 2, 1, 1]
    h, d = 576, 64
    layer_dense = lambda q, kv, inter: (2 * h * q * d + 2 * h * kv * d + 3 * h * inter) * 2 + 2 * h * 2  # noqa: E731
    w2 = stage_weights(spec, range(1), 2, 1, False, False, 2)
    assert w2.dense == pytest.approx(layer_dense(6, 2, 768))  # 6 of 9 query heads, 2 of 3 KV heads
    odd = ModelSpec.from_config({**config, "intermediate_size": 1537})
    assert stage_weights(odd, range(1), 2, 1, False, False, 2).dense == \
        pytest.approx(layer_dense(6, 2, 769))  # ceil(1537 / 2) MLP columns
    assert activation_bytes(spec, 2, 2, False, chunk_tokens=1) == (4 * h + (6 + 2 * 2) * d + 3 * 768) * 2
