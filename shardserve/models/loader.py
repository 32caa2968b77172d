"""Builds a model for one rank and fills it from safetensors (or a GGUF file, models/gguf_loader.py), reading only
that rank's slice of each tensor."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from shardserve.config import ModelConfig
from shardserve.layers.attention import AttentionBackend
from shardserve.layers.lazy_tensor import LazyTensor, ReadCounter
from shardserve.models.base import ModelShard
from shardserve.models.gguf_loader import is_gguf, iter_gguf_weights
from shardserve.models.registry import get_model_class

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def checkpoint_files(model_dir: str | Path) -> dict[str, list[str]]:
    """{file: [tensor names]} from model.safetensors.index.json, or every *.safetensors in the directory."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            files.setdefault(str(model_dir / fname), []).append(name)
        return files
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    out = {}
    for f in found:
        with safe_open(str(f), framework="pt") as fh:
            out[str(f)] = list(fh.keys())
    return out


def iter_weights(model_dir: str | Path, wants, counter: ReadCounter, progress: bool = False
                 ) -> Iterator[tuple[str, LazyTensor]]:
    """Yield (name, LazyTensor) for every tensor `wants(name)` accepts; files holding none are never opened."""
    files = {f: [n for n in names if wants(n)] for f, names in checkpoint_files(model_dir).items()}
    total = sum(len(v) for v in files.values())
    bar = tqdm(total=total, desc="Loading weights", unit="tensor", disable=not progress, leave=False)
    for fname, names in files.items():
        if not names:
            continue
        with safe_open(fname, framework="pt") as fh:
            for name in names:
                sl = fh.get_slice(name)
                yield name, LazyTensor(sl, tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype()), counter)
                bar.update(1)
    bar.close()


def load_model(model_config: ModelConfig, shard: ModelShard, backend: AttentionBackend, device: str,
               progress: bool = False) -> tuple[torch.nn.Module, ReadCounter]:
    """Instantiate this rank's part of the model on `device` and load its weights. Returns (model, bytes read)."""
    cls = get_model_class(model_config.architecture)
    with torch.device(device):
        model = cls(model_config.hf_config, shard, backend, model_config.dtype)
    counter = ReadCounter()
    if is_gguf(model_config.model):
        weights = iter_gguf_weights(model_config.model, model_config.hf_config, model.wants, counter, progress)
    else:
        weights = iter_weights(model_config.model, model.wants, counter, progress)
    model.load_weights(weights)
    return model.eval(), counter
