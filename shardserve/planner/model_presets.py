"""Model presets: the real Hugging Face config.json contents of common models, by name.

Each preset is the `config.json` published in the model's Hugging Face repository (the repository id
is the first alias), so `transformers.AutoConfig.for_model(**get_model_preset(name))` builds the same
architecture. Nothing here downloads anything.
"""

from __future__ import annotations

import copy
import re

_LLAMA2 = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_cache": True,
    "vocab_size": 32000,
}

_LLAMA31 = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 40960,
    "model_type": "qwen3",
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

_PRESETS: dict[str, dict] = {
    "Llama-2-7B": {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                   "num_hidden_layers": 32, "num_key_value_heads": 32, "transformers_version": "4.31.0.dev0"},
    "Llama-2-13B": {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
                    "num_hidden_layers": 40, "num_key_value_heads": 40, "transformers_version": "4.32.0.dev0"},
    "Llama-2-70B": {**_LLAMA2, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                    "num_hidden_layers": 80, "num_key_value_heads": 8, "transformers_version": "4.32.0.dev0"},
    "Llama-3.1-8B": {**_LLAMA31, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                     "num_hidden_layers": 32},
    "Llama-3.1-70B": {**_LLAMA31, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                      "num_hidden_layers": 80},
    "Llama-3.1-405B": {**_LLAMA31, "hidden_size": 16384, "intermediate_size": 53248, "num_attention_heads": 128,
                       "num_hidden_layers": 126},
    "Mistral-7B": {
        "architectures": ["MistralForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.34.0.dev0",
        "use_cache": True,
        "vocab_size": 32000,
    },
    "Mixtral-8x7B": {
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mixtral",
        "num_attention_heads": 32,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0.dev0",
        "use_cache": True,
        "vocab_size": 32000,
    },
    "Qwen2-7B": {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 131072,
        "max_window_layers": 28,
        "model_type": "qwen2",
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.37.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 152064,
    },
    "Qwen1.5-MoE-A2.7B": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "decoder_sparse_step": 1,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 5632,
        "max_position_embeddings": 8192,
        "max_window_layers": 21,
        "model_type": "qwen2_moe",
        "moe_intermediate_size": 1408,
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 24,
        "num_key_value_heads": 16,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 5632,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.0.dev0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "Qwen3-0.6B": {**_QWEN3, "hidden_size": 1024, "intermediate_size": 3072, "max_window_layers": 28,
                   "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
                   "tie_word_embeddings": True},
    "Qwen3-8B": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "max_window_layers": 36,
                 "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8},
    "Qwen3-32B": {**_QWEN3, "hidden_size": 5120, "intermediate_size": 25600, "max_window_layers": 64,
                  "num_attention_heads": 64, "num_hidden_layers": 64, "num_key_value_heads": 8},
    "Qwen3-30B-A3B": {
        **_QWEN3,
        "architectures": ["Qwen3MoeForCausalLM"],
        "decoder_sparse_step": 1,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "max_window_layers": 48,
        "mlp_only_layers": [],
        "model_type": "qwen3_moe",
        "moe_intermediate_size": 768,
        "norm_topk_prob": True,
        "num_attention_heads": 32,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 48,
        "num_key_value_heads": 4,
        "output_router_logits": False,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
    },
}

# Hugging Face repository ids (and common spellings) for each preset.
_ALIASES: dict[str, list[str]] = {
    "Llama-2-7B": ["meta-llama/Llama-2-7b-hf", "llama2-7b"],
    "Llama-2-13B": ["meta-llama/Llama-2-13b-hf", "llama2-13b"],
    "Llama-2-70B": ["meta-llama/Llama-2-70b-hf", "llama2-70b"],
    "Llama-3.1-8B": ["meta-llama/Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-8B", "llama3.1-8b"],
    "Llama-3.1-70B": ["meta-llama/Llama-3.1-70B", "meta-llama/Meta-Llama-3.1-70B", "llama3.1-70b"],
    "Llama-3.1-405B": ["meta-llama/Llama-3.1-405B", "meta-llama/Meta-Llama-3.1-405B", "llama3.1-405b"],
    "Mistral-7B": ["mistralai/Mistral-7B-v0.1", "Mistral-7B-v0.1"],
    "Mixtral-8x7B": ["mistralai/Mixtral-8x7B-v0.1", "Mixtral-8x7B-v0.1"],
    "Qwen2-7B": ["Qwen/Qwen2-7B"],
    "Qwen1.5-MoE-A2.7B": ["Qwen/Qwen1.5-MoE-A2.7B", "Qwen2-MoE-A2.7B"],
    "Qwen3-0.6B": ["Qwen/Qwen3-0.6B"],
    "Qwen3-8B": ["Qwen/Qwen3-8B"],
    "Qwen3-32B": ["Qwen/Qwen3-32B"],
    "Qwen3-30B-A3B": ["Qwen/Qwen3-30B-A3B"],
}


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


_LOOKUP: dict[str, str] = {}
for _name, _aliases in _ALIASES.items():
    for _alias in [_name, *_aliases]:
        _LOOKUP[_key(_alias)] = _name


def model_preset_names() -> list[str]:
    """Canonical preset names, in a stable order."""
    return list(_PRESETS)


def get_model_preset(name: str) -> dict:
    """Return a fresh copy of the HF config dict for `name` (case-insensitive; HF repo ids accepted)."""
    canonical = canonical_model_name(name)
    if canonical is None:
        raise ValueError(f"unknown model preset {name!r}; valid names: {', '.join(model_preset_names())}")
    return copy.deepcopy(_PRESETS[canonical])


def canonical_model_name(name: str) -> str | None:
    """The preset's canonical name for `name` or an alias, or None."""
    return _LOOKUP.get(_key(name))
