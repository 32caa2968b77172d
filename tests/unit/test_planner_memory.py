"""Planner memory arithmetic: exact parameter counts, KV bytes, sharding per device."""

from __future__ import annotations

import math

import pytest

from shardserve.planner.memory import (
    ModelSpec,
    activation_bytes,
    active_params,
    kv_bytes_per_token,
    kv_heads_per_device,
    load_model_config,
    stage_layers,
    stage_weights,
    total_params,
)
from shardserve.planner.hardware import PlannerError
from shardserve.planner.model_presets import get_model_preset, model_preset_names


def spec_of(name: str) -> ModelSpec:
    return ModelSpec.from_config(get_model_preset(name), name)


# Published totals, each within 0.5% required. Sources: the Hugging Face model pages' parameter
# count (safetensors metadata) for the Llama, Mistral and Qwen2 repositories; the Mistral AI
# Mixtral announcement ("46.7B total parameters ... 12.9B parameters per token"); the Qwen3 and
# Qwen1.5-MoE model cards ("Number of Parameters"); Meta's Llama 3.1 405B name.
PUBLISHED_TOTAL = {
    "Llama-2-7B": 6.74e9,
    "Llama-2-13B": 13.0e9,
    "Llama-2-70B": 68.98e9,
    "Llama-3.1-8B": 8.03e9,
    "Llama-3.1-70B": 70.6e9,
    "Llama-3.1-405B": 405e9,
    "Mistral-7B": 7.24e9,
    "Mixtral-8x7B": 46.7e9,
    "Qwen2-7B": 7.62e9,
    "Qwen1.5-MoE-A2.7B": 14.3e9,
    "Qwen3-8B": 8.2e9,
    "Qwen3-32B": 32.8e9,
    "Qwen3-30B-A3B": 30.5e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTAL))
def test_total_params_match_published(name: str) -> None:
    assert total_params(spec_of(name)) == pytest.approx(PUBLISHED_TOTAL[name], rel=0.005)


def test_qwen3_06b_non_embedding_params_match_model_card() -> None:
    # Qwen3-0.6B card: "Number of Paramaters (Non-Embedding): 0.44B" (total given only as 0.6B).
    spec = spec_of("Qwen3-0.6B")
    assert spec.tie_word_embeddings
    assert total_params(spec) - spec.vocab_size * spec.hidden_size == pytest.approx(0.44e9, rel=0.005)


@pytest.mark.parametrize("name,published", [("Mixtral-8x7B", 12.9e9), ("Qwen1.5-MoE-A2.7B", 2.7e9)])
def test_active_params_match_published(name: str, published: float) -> None:
    assert active_params(spec_of(name)) == pytest.approx(published, rel=0.005)


def test_llama2_70b_fp16_weights_are_138_gb() -> None:
    spec = spec_of("Llama-2-70B")
    w = stage_weights(spec, range(spec.num_layers), tp=1, ep=1, first=True, last=True, weight_bytes=2)
    assert w.total == 2 * total_params(spec)
    assert w.total / 1e9 == pytest.approx(137.95, abs=0.01)


@pytest.mark.xdist_group("planner-transformers")  # one worker pays the transformers import
def test_counts_equal_transformers_on_meta_models() -> None:
    """Build every preset with transformers on the meta device (no memory) and compare exactly."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for name in model_preset_names():
        config = transformers.AutoConfig.for_model(**get_model_preset(name))
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        expected = sum(p.numel() for p in model.parameters())  # a tied weight is one Parameter
        assert total_params(spec_of(name)) == expected, name


@pytest.mark.xdist_group("planner-transformers")
@pytest.mark.parametrize("overrides", [
    {"model_type": "llama", "attention_bias": True, "mlp_bias": True},
    {"model_type": "qwen3", "attention_bias": True, "head_dim": 96, "tie_word_embeddings": True},
    {"model_type": "qwen2_moe", "decoder_sparse_step": 2, "mlp_only_layers": [1], "qkv_bias": False},
    {"model_type": "qwen3_moe", "mlp_only_layers": [0, 3], "num_experts": 6, "num_experts_per_tok": 2},
    {"model_type": "mixtral", "num_local_experts": 4, "head_dim": 64},
])
def test_awkward_configs_equal_transformers(overrides: dict) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
           "shared_expert_intermediate_size": 384, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 4, "vocab_size": 1000, "num_experts": 8, "num_experts_per_tok": 2, **overrides}
    config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert total_params(ModelSpec.from_config(config.to_dict())) == sum(p.numel() for p in model.parameters())


def test_kv_bytes_per_token_exact() -> None:
    assert kv_bytes_per_token(spec_of("Llama-2-70B"), 2) == 2 * 80 * 8 * 128 * 2
    assert kv_bytes_per_token(spec_of("Llama-2-7B"), 2) == 2 * 32 * 32 * 128 * 2
    assert kv_bytes_per_token(spec_of("Qwen3-30B-A3B"), 1) == 2 * 48 * 4 * 128 * 1  # fp8 KV
    assert kv_bytes_per_token(spec_of("Qwen3-0.6B"), 2) == 2 * 28 * 8 * 128 * 2  # explicit head_dim


def test_kv_heads_replicated_when_tp_exceeds_them() -> None:
    spec = spec_of("Qwen3-30B-A3B")  # 4 KV heads
    assert [kv_heads_per_device(spec, tp) for tp in (1, 2, 4, 8)] == [4, 2, 1, 1]
    assert kv_bytes_per_token(spec, 2, tp=8) == 2 * 48 * 1 * 128 * 2  # ceil: one head per rank
    # the K/V projections are replicated too: at tp=8 each rank holds one head's K and V
    w4 = stage_weights(spec, range(1), 4, 1, False, False, 2)
    w8 = stage_weights(spec, range(1), 8, 1, False, False, 2)
    h, d = spec.hidden_size, spec.head_dim
    q_o = 2 * h * spec.num_heads * d
    assert w4.dense - w8.dense == pytest.approx((q_o / 4 - q_o / 8) * 2)


def test_tp_shards_everything_but_norms() -> None:
    spec = spec_of("Llama-2-7B")  # 32 KV heads, vocab 32000 divisible by 4
    full = stage_weights(spec, range(32), 1, 1, True, True, 2).total
    norms = (2 * spec.num_layers + 1) * spec.hidden_size * 2
    quarter = stage_weights(spec, range(32), 4, 1, True, True, 2).total
    assert quarter == pytest.approx((full - norms) / 4 + norms)


def test_pipeline_stages_hold_their_layers_and_tied_embedding_twice() -> None:
    spec = spec_of("Qwen3-0.6B")  # tied embeddings
    vocab_bytes = spec.vocab_size * spec.hidden_size * 2
    one = stage_weights(spec, range(28), 1, 1, True, True, 2)
    assert one.embedding == 0 and one.head == vocab_bytes  # one shared matrix
    first, last = stage_layers(28, 2)
    s0 = stage_weights(spec, first, 1, 1, True, False, 2)
    s1 = stage_weights(spec, last, 1, 1, False, True, 2)
    assert s0.embedding == vocab_bytes and s0.head == 0
    assert s1.head == vocab_bytes and s1.embedding == 0
    assert s0.total + s1.total == one.total + vocab_bytes


def test_stage_layers_follow_vllm_partition() -> None:
    assert [len(r) for r in stage_layers(80, 2)] == [40, 40]
    assert [len(r) for r in stage_layers(10, 4)] == [2, 3, 3, 2]
    assert [len(r) for r in stage_layers(126, 4)] == [31, 32, 32, 31]
    assert sum(len(r) for r in stage_layers(61, 8)) == 61


def test_fp8_quantises_decoder_matrices_only() -> None:
    spec = spec_of("Llama-2-70B")
    bf16 = stage_weights(spec, range(80), 1, 1, True, True, 2).total
    fp8 = stage_weights(spec, range(80), 1, 1, True, True, 1).total
    sixteen_bit = (2 * spec.vocab_size * spec.hidden_size + (2 * 80 + 1) * spec.hidden_size) * 2
    assert fp8 == (bf16 - sixteen_bit) / 2 + sixteen_bit


def test_experts_split_over_max_tp_ep() -> None:
    spec = spec_of("Mixtral-8x7B")
    expert_bytes = 8 * 3 * spec.hidden_size * spec.moe_intermediate_size * 2
    assert stage_weights(spec, range(1), 1, 1, False, False, 2).experts == expert_bytes
    assert stage_weights(spec, range(1), 2, 1, False, False, 2).experts == expert_bytes / 2
    assert stage_weights(spec, range(1), 2, 8, False, False, 2).experts == expert_bytes / 8
    assert stage_weights(spec, range(1), 1, 4, False, False, 2).experts == expert_bytes / 4


def test_activation_bytes_scale_with_chunk_and_tp() -> None:
    spec = spec_of("Llama-3.1-8B")
    a1 = activation_bytes(spec, 1, 2, last=False, chunk_tokens=4096)
    assert activation_bytes(spec, 1, 2, last=False, chunk_tokens=8192) == pytest.approx(2 * a1)
    assert activation_bytes(spec, 4, 2, last=False, chunk_tokens=4096) < a1
    logits = 256 * math.ceil(spec.vocab_size / 1) * 4
    assert activation_bytes(spec, 1, 2, last=True, chunk_tokens=4096) == pytest.approx(a1 + logits)


def test_presets_are_case_insensitive_copies_with_clear_errors() -> None:
    a = get_model_preset("llama-3.1-8b")
    assert a == get_model_preset("meta-llama/Llama-3.1-8B") == get_model_preset("LLAMA-3.1-8B")
    a["hidden_size"] = 1
    assert get_model_preset("Llama-3.1-8B")["hidden_size"] == 4096
    with pytest.raises(ValueError, match="valid names: .*Qwen3-30B-A3B"):
        get_model_preset("gpt-5")


def test_load_model_config_sources(tmp_path) -> None:
    import json

    (tmp_path / "config.json").write_text(json.dumps(get_model_preset("Qwen3-8B")))
    assert load_model_config(str(tmp_path))[0]["hidden_size"] == 4096
    assert load_model_config(str(tmp_path / "config.json"))[0]["num_hidden_layers"] == 36
    assert load_model_config("Mixtral-8x7B")[1] == "Mixtral-8x7B"
    with pytest.raises(PlannerError, match="presets: "):
        load_model_config("no-such-model")
    with pytest.raises(PlannerError, match="unsupported model_type 'gpt2'"):
        ModelSpec.from_config({"model_type": "gpt2"})
