"""Maps a checkpoint's `architectures` entry to the model class that implements it."""
from __future__ import annotations

import importlib

from shardserve.config import ConfigError

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("shardserve.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("shardserve.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("shardserve.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("shardserve.models.llama", "Qwen3ForCausalLM"),
    "MixtralForCausalLM": ("shardserve.models.mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("shardserve.models.qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("shardserve.models.qwen_moe", "Qwen3MoeForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def register_model(architecture: str, module: str, cls_name: str) -> None:
    _MODELS[architecture] = (module, cls_name)


def get_model_class(architecture: str) -> type:
    if architecture not in _MODELS:
        raise ConfigError(f"model architecture {architecture!r} is not supported; supported architectures: "
                          f"{', '.join(supported_architectures())}")
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
