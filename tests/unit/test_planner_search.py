"""Planner layout search: candidate enumeration goldens, objectives, recommendation, infeasible requests."""

from __future__ import annotations

import pytest

from shardserve.planner.hardware import parse_gpus
from shardserve.planner.memory import ModelSpec
from shardserve.planner.model_presets import get_model_preset
from shardserve.planner.recommend import make_plan
from shardserve.planner.search import Request, enumerate_shapes, evaluate, search


def spec_of(name: str) -> ModelSpec:
    return ModelSpec.from_config(get_model_preset(name), name)


def test_tp_beyond_the_heads_is_excluded() -> None:
    # heads that do not divide by tp are split unevenly by KV group (28 heads / 4 KV heads at tp 8: 4 + 3 per pair)
    ok, excluded = enumerate_shapes(spec_of("Qwen2-7B"), parse_gpus("8xH100"))  # 28 heads, 4 KV heads
    assert sorted(ok) == [
        (1, 1, 8, 1), (1, 2, 4, 1), (1, 4, 2, 1), (1, 8, 1, 1),
        (2, 1, 4, 1), (2, 2, 2, 1), (2, 4, 1, 1),
        (4, 1, 2, 1), (4, 2, 1, 1),
        (8, 1, 1, 1),
    ]
    assert excluded == []
    few = ModelSpec.from_config({**get_model_preset("Qwen2-7B"), "num_attention_heads": 4, "num_key_value_heads": 2})
    ok4, excluded4 = enumerate_shapes(few, parse_gpus("8xH100"))
    assert max(tp for tp, _, _, _ in ok4) == 4
    assert excluded4 == [((8, 1, 1, 1), "tp=8 exceeds the 4 attention heads (every rank needs one)")]


def test_tp_never_spans_nodes() -> None:
    spec = spec_of("Llama-3.1-405B")
    ok, excluded = enumerate_shapes(spec, parse_gpus("8xH100", nodes=2))
    assert all(tp <= 8 for tp, _, _, _ in ok)
    assert ((16, 1, 1, 1), "tp=16 would span nodes (8 GPUs per node)") in excluded
    ok4, _ = enumerate_shapes(spec, parse_gpus("4xH100", nodes=4))
    assert max(tp for tp, _, _, _ in ok4) == 4
    assert all(tp * pp * dp == 16 for tp, pp, dp, _ in ok4)


def test_experts_divisible_by_ep() -> None:
    ok, excluded = enumerate_shapes(spec_of("Mixtral-8x7B"), parse_gpus("8xH100", nodes=2))  # 8 experts
    eps = {ep for tp, pp, dp, ep in ok if (tp, pp, dp) == (1, 1, 16)}
    assert eps == {1, 2, 4, 8}
    assert ((1, 1, 16, 16), "8 experts not divisible by ep=16") in excluded
    ok60, excl60 = enumerate_shapes(spec_of("Qwen1.5-MoE-A2.7B"), parse_gpus("8xH100"))  # 60 experts
    assert all(60 % ep == 0 for _, _, _, ep in ok60)
    assert any(reason == "60 experts not divisible by ep=8" for _, reason in excl60)
    # ep covers the TP group or whole replicas: a multiple of tp dividing tp*dp
    assert all(ep == 1 or (ep % tp == 0 and (tp * dp) % ep == 0) for tp, _, dp, ep in ok)


def test_dense_models_have_no_expert_parallel_layouts() -> None:
    ok, _ = enumerate_shapes(spec_of("Llama-3.1-8B"), parse_gpus("8xH100"))
    assert {ep for *_, ep in ok} == {1}


def test_pipeline_stages_never_exceed_layers() -> None:
    cfg = {**get_model_preset("Qwen3-0.6B"), "num_hidden_layers": 2}
    ok, excluded = enumerate_shapes(ModelSpec.from_config(cfg), parse_gpus("4xL4"))
    assert max(pp for _, pp, _, _ in ok) == 2
    assert ((1, 4, 1, 1), "pp=4 exceeds the 2 layers") in excluded


def test_layout_memory_adds_up_and_bigger_tp_needs_less_per_device() -> None:
    spec, cluster = spec_of("Llama-3.1-70B"), parse_gpus("8xH100")
    req = Request()
    lays = {lay.shape: lay for lay in (evaluate(spec, cluster, s, req) for s in enumerate_shapes(spec, cluster)[0])}
    for lay in lays.values():
        m = lay.memory_per_device
        assert m.weights + m.kv_cache + m.activations + m.overhead + m.free == pytest.approx(
            cluster.gpu.memory_bytes, abs=4)
        assert lay.fits == (m.free >= 0)
    assert not lays[(1, 1, 8, 1)].fits  # 131 GiB of weights on one 80 GiB GPU
    assert lays[(8, 1, 1, 1)].memory_per_device.weights < lays[(4, 1, 2, 1)].memory_per_device.weights
    assert lays[(8, 1, 1, 1)].max_concurrent_seqs > lays[(4, 1, 2, 1)].max_concurrent_seqs / 2


def test_batch_one_recommends_the_lowest_latency_layout() -> None:
    plan = make_plan(spec_of("Llama-3.1-70B"), parse_gpus("8xH100"), Request(batch=1))
    best = plan.recommended
    assert (best.tp, best.pp) == (8, 1)
    fitting = [lay for lay in plan.layouts if lay.fits]
    assert best.decode_tok_s_per_seq == max(lay.decode_tok_s_per_seq for lay in fitting)
    assert any("fastest single-sequence decode" in r for r in plan.reasons)


def test_large_batch_recommends_the_highest_throughput_layout() -> None:
    plan = make_plan(spec_of("Llama-3.1-8B"), parse_gpus("8xH100"), Request(batch=256))
    best = plan.recommended
    fitting = [lay for lay in plan.layouts if lay.fits]
    assert best.throughput_tok_s == max(lay.throughput_tok_s for lay in fitting)
    assert best.dp > 1  # a model this small gains more from replicas than from TP
    assert plan.reasons and "throughput" in plan.reasons[1]
    assert plan.reasons[0].startswith(f"tp={best.tp}")
    assert "GiB per device left for KV cache" in plan.reasons[0]


def test_rate_objective_prefers_layouts_that_sustain_it() -> None:
    spec, cluster = spec_of("Llama-3.1-70B"), parse_gpus("8xH100")
    plan = make_plan(spec, cluster, Request(rate=2.0))
    assert plan.recommended.sustains_rate
    assert plan.recommended.throughput_tok_s == pytest.approx(2.0 * 256)
    overload = make_plan(spec, cluster, Request(rate=1000.0))
    assert not any(lay.sustains_rate for lay in overload.layouts if lay.fits)
    assert "no layout sustains" in overload.reasons[1]


def test_fp8_weights_fit_where_bf16_does_not() -> None:
    spec, cluster = spec_of("Llama-3.1-70B"), parse_gpus("1xH100")
    assert make_plan(spec, cluster, Request()).recommended is None
    assert make_plan(spec, cluster, Request(dtype="fp8")).recommended is not None


def test_infeasible_request_names_the_smallest_cluster() -> None:
    spec = spec_of("Llama-2-70B")
    plan = make_plan(spec, parse_gpus("1xA100-40GB"), Request())
    assert plan.recommended is None
    assert plan.smallest_cluster is not None and plan.smallest_cluster.num_gpus == 4
    assert "smallest cluster that fits is 4xA100-40GB" in plan.message
    # and 3 really do not fit (140 GB of weights in 3 x 40 GB, whatever the layout)
    assert not any(lay.fits for lay in search(spec, parse_gpus("3xA100-40GB"), Request())[0])


def test_infeasible_across_nodes() -> None:
    plan = make_plan(spec_of("Llama-3.1-405B"), parse_gpus("8xL4"), Request())
    c = plan.smallest_cluster
    assert plan.recommended is None and c is not None and c.gpus_per_node == 8
    assert f"{c.num_gpus}xL4 ({c.nodes} nodes of 8)" in plan.message
    smaller = c.with_size(8, c.nodes - 1)
    assert not any(lay.fits for lay in search(plan.spec, smaller, plan.request)[0])
    assert plan.to_dict()["infeasible"]["smallest_cluster"]["gpus"] == c.num_gpus
