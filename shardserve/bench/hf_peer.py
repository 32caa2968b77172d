"""The transformers peer of the benchmarks: the same weights as the engine, from a Hugging Face directory or from a
GGUF file (transformers' own GGUF reader dequantizes, renames and un-permutes the tensors)."""
from __future__ import annotations

from pathlib import Path

import torch


def load_hf_peer(model: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from shardserve.models.gguf_loader import find_gguf, is_gguf
    if not is_gguf(str(model)):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype).to(device).eval()
    return hf_model_from_gguf(find_gguf(model), dtype).to(device)


def hf_model_from_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """transformers' load of a GGUF file: its GGUF config, and the tensors its loader dequantizes
    (load_gguf_checkpoint; from_pretrained(gguf_file=...) does the same but insists on `accelerate`)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    path = Path(path)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or not set(missing) <= allowed:
        raise ValueError(f"transformers could not map {path.name}: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(dtype).eval()
