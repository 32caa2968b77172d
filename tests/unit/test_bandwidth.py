"""The yardsticks of `bench latency`: weight bytes per decode step against the real checkpoints' tensors, and a
copy bandwidth that is a plausible number."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from checkpoints import ARCHS
from shardserve.bench.bandwidth import copy_bandwidth_gbps, decode_weight_bytes


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "tied"])
def test_decode_weight_bytes_counts_the_checkpoint(checkpoint, arch):
    path = checkpoint(arch)
    cfg = json.loads((path / "config.json").read_text())
    numel = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            numel += sum(torch.Size(st.get_slice(k).get_shape()).numel() for k in st.keys())
    embed = cfg["vocab_size"] * cfg["hidden_size"]
    read = numel - (embed - cfg["hidden_size"] if not ARCHS[arch][1].get("tie_word_embeddings") else 0)
    assert decode_weight_bytes(cfg, torch.bfloat16) == 2 * read
    assert decode_weight_bytes(cfg, torch.float32) == 4 * read


def test_copy_bandwidth_is_plausible():
    gbps = copy_bandwidth_gbps("cpu", nbytes=1 << 24, iters=3)
    assert 0.1 < gbps < 10_000
