"""`shardserve make-random-model --like PRESET DIR`: a full-size checkpoint with seeded random weights for any
planner preset (e.g. llama-3-8b), so speed can be measured where nothing can be downloaded.

Tensor names and shapes come from `transformers` itself (the model built on the meta device, so no memory is
used); weights are drawn shard by shard (about --shard-size bytes each) and written as safetensors with an index,
plus the built-in tokenizer (ids beyond its vocabulary are still valid model inputs)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from shardserve.config import parse_dtype, parse_size


def preset_config(like: str, overrides: dict[str, Any] | None = None, dtype: str = "bfloat16") -> dict[str, Any]:
    from shardserve.planner.model_presets import get_model_preset
    cfg = {**get_model_preset(like), **(overrides or {})}
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    return cfg


def tensor_specs(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor `save_pretrained` would write for this config, in order."""
    from transformers import AutoConfig, AutoModelForCausalLM
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("torch_dtype", "dtype")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    tied = bool(cfg.get("tie_word_embeddings", False))
    return [(n, tuple(t.shape)) for n, t in model.state_dict().items()
            if not (tied and n == "lm_head.weight") and "rotary_emb" not in n]


def _fill(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return torch.ones(shape, dtype=dtype)
    t = torch.empty(shape, dtype=torch.float32)
    t.normal_(0.0, 0.02, generator=gen)
    return t.to(dtype)


def write_random_model(like: str, out_dir: str | Path, dtype: str = "bfloat16", seed: int = 0,
                       overrides: dict[str, Any] | None = None, shard_size: str | int = "2GiB",
                       progress: bool = True) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = parse_dtype(dtype, {})
    cfg = preset_config(like, overrides, str(torch_dtype).replace("torch.", ""))
    specs = tensor_specs(cfg)
    limit = parse_size(shard_size) or 1
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = torch.Size(shape).numel() * torch_dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    bar = tqdm(total=len(specs), desc=f"Writing random {like}", unit="tensor", disable=not progress)
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            tensors[name] = _fill(name, shape, gen, torch_dtype)
            total += tensors[name].numel() * tensors[name].element_size()
            weight_map[name] = fname
            bar.update(1)
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    bar.close()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    from shardserve.models.tiny import write_tiny_tokenizer
    write_tiny_tokenizer(out)
    (out / "README.md").write_text(f"# Random {like}\n\nShape of {like} with seeded RANDOM weights (seed {seed}, "
                                   f"{dtype}) written by `shardserve make-random-model`: for speed measurements "
                                   "only; it generates noise.\n")
    return out
