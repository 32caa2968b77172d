"""Golden splits for the pipeline partitioner: even, explicit, device map, automatic, and refusals."""
from __future__ import annotations

import json

import pytest

from shardserve.config import ConfigError
from shardserve.distributed.pipeline import (StageCosts, auto_partition, even_partition, layer_ranges,
                                             parse_device_map, parse_layer_partition)


@pytest.mark.parametrize("layers,pp,want", [
    (8, 1, [8]), (8, 2, [4, 4]), (9, 2, [5, 4]), (10, 3, [3, 4, 3]), (11, 4, [3, 3, 3, 2]),
    (32, 3, [11, 11, 10]), (33, 4, [8, 9, 8, 8]), (80, 6, [13, 14, 14, 13, 13, 13]), (4, 4, [1, 1, 1, 1]),
])
def test_even_partition_golden(layers, pp, want):
    assert even_partition(layers, pp) == want
    assert sum(want) == layers


def test_even_refuses_more_stages_than_layers():
    with pytest.raises(ConfigError, match="cannot split 3 layers over 4"):
        even_partition(3, 4)


def test_layer_ranges():
    assert layer_ranges([3, 4, 3]) == [(0, 3), (3, 7), (7, 10)]


def test_explicit_partition():
    assert parse_layer_partition("10,12,10", 32, 3) == [10, 12, 10]
    with pytest.raises(ConfigError, match="sums to 31"):
        parse_layer_partition("10,11,10", 32, 3)
    with pytest.raises(ConfigError, match="2 stages"):
        parse_layer_partition("16,16", 32, 3)
    with pytest.raises(ConfigError, match="stage 1 .* is empty"):
        parse_layer_partition("16,0,16", 32, 3)
    with pytest.raises(ConfigError, match="layer counts"):
        parse_layer_partition("a,b", 32, 2)


def test_device_map_forms(tmp_path):
    dm = {"model.embed_tokens": 0, "model.layers.0-3": 1, "model.layers.4-7": 2, "lm_head": 3}
    assert parse_device_map(json.dumps(dm), 8, 4) == [0, 4, 4, 0]
    f = tmp_path / "map.json"
    f.write_text(json.dumps(dm))
    assert parse_device_map(str(f), 8, 4) == [0, 4, 4, 0]
    single = {f"model.layers.{i}": (0 if i < 3 else 1) for i in range(8)}
    assert parse_device_map(single, 8, 2) == [3, 5]


@pytest.mark.parametrize("dm,msg", [
    ({"model.layers.0-2": 0, "model.layers.4-7": 1}, "misses layer\\(s\\) 3"),
    ({"model.layers.0-7": 0, "model.layers.3": 1}, "layer 3 twice"),
    ({"model.layers.0-3": 1, "model.layers.4-7": 0}, "non-decreasing"),
    ({"model.embed_tokens": 1, "model.layers.0-7": 1}, "embedding on stage 1"),
    ({"model.layers.0-7": 0, "lm_head": 0}, "must be on the last stage"),
    ({"model.layers.0-9": 0}, "outside 0-7"),
    ({"model.layers.0-7": 5}, "not in \\[0, 2\\)"),
    ({"transformer.h.0": 0}, "not understood"),
])
def test_device_map_refusals(dm, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_device_map(dm, 8, 2)


def test_device_map_empty_middle_stage_refused_but_head_only_last_stage_allowed():
    with pytest.raises(ConfigError, match="stage 1 .* is empty"):
        parse_device_map({"model.layers.0-3": 0, "model.layers.4-7": 2}, 8, 3)
    assert parse_device_map({"model.layers.0-7": 0, "lm_head": 1}, 8, 2) == [8, 0]


def _costs(cap: int, head_flops: float = 0.0) -> StageCosts:
    return StageCosts(layer_flops=100.0, head_flops=head_flops, layer_weight_bytes=10, embed_bytes=5, head_bytes=5,
                      layer_kv_bytes=0, activation_bytes=0, cap_bytes=cap)


def test_auto_partition_balances_compute_including_head():
    assert auto_partition(8, 2, _costs(10**9)) == [4, 4]
    # the LM head costs two layers: the last stage gets two fewer
    assert auto_partition(8, 2, _costs(10**9, head_flops=200.0)) == [5, 3]
    # 10 layers + a head worth one layer = 11 units over 3 stages: the slowest stage cannot do better than 4
    split = auto_partition(10, 3, _costs(10**9, head_flops=100.0))
    assert split == [4, 4, 2]
    assert max(split[0], split[1], split[2] + 1) == 4


def test_auto_partition_respects_memory_cap():
    # cap 45 bytes: at most 4 layers with the embedding (45), 4 with the head; 8 layers over 2 stages fits only 4/4
    assert auto_partition(8, 2, _costs(45, head_flops=300.0)) == [4, 4]
    with pytest.raises(ConfigError, match="does not fit 2 stages"):
        auto_partition(8, 2, _costs(30))


def test_auto_partition_on_a_real_config():
    """The built-in model's shape: the head (vocab 8192 x 512) weighs about 1.4 layers of compute."""
    from shardserve.config import ModelConfig
    from shardserve.distributed.pipeline import stage_costs
    from shardserve.models.tiny import tiny_model_config
    import torch
    cfg = ModelConfig(model="x", dtype=torch.float32, hf_config=tiny_model_config(), max_model_len=2048, tokenizer="x")
    costs = stage_costs(cfg, tp=1, cap_bytes=10**12, chunk_tokens=2048)
    assert costs.layer_weight_bytes == 4 * (512 * 512 * 2 + 2 * 512 * 256 + 3 * 512 * 1408 + 2 * 512)
    assert auto_partition(8, 2, costs) == [5, 3]
