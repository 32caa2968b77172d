"""The Attention layer (what it passes to the backend, its checks) and build_attention_backend (config + parallel
state → backend, the SHARDSERVE_ATTENTION_BACKEND override)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from shardserve.config import ModelConfig
from shardserve.layers.attention import Attention, AttentionBackend, build_attention_backend
from shardserve.layers.attention.torch_backend import TorchAttentionBackend


class SpyBackend(AttentionBackend):
    def __init__(self):
        self.calls = []

    def forward(self, q, k, v, kv_cache, meta, scale, sliding_window=None, logits_soft_cap=None, return_lse=False):
        self.calls.append((q.shape, k.shape, v.shape, scale, sliding_window, logits_soft_cap, return_lse))
        return q.reshape(q.shape[0], -1)


def _model(heads=8, kv_heads=2, dtype=torch.float32) -> ModelConfig:
    hf = dict(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=heads * 16, vocab_size=10,
              num_hidden_layers=1)
    return ModelConfig(model="m", dtype=dtype, hf_config=hf, max_model_len=64, tokenizer="m")


def test_layer_owns_scale_window_and_soft_cap():
    spy = SpyBackend()
    attn = Attention(8, 16, spy, 2, sliding_window=5, logits_soft_cap=30.0)
    assert attn.scale == 16 ** -0.5
    q, k = torch.randn(3, 8 * 16), torch.randn(3, 2 * 16)  # flat [tokens, heads * dim] is accepted too
    attn(q, k, k, None, None)
    attn(q.view(3, 8, 16), k.view(3, 2, 16), k.view(3, 2, 16), None, None, return_lse=True)
    assert spy.calls == [((3, 8, 16), (3, 2, 16), (3, 2, 16), 16 ** -0.5, 5, 30.0, False),
                         ((3, 8, 16), (3, 2, 16), (3, 2, 16), 16 ** -0.5, 5, 30.0, True)]
    assert Attention(4, 16, spy, scale=0.5).scale == 0.5 and Attention(4, 16, spy).num_kv_heads == 4
    assert "sliding_window=5" in repr(attn)


@pytest.mark.parametrize("kw", [dict(num_kv_heads=3), dict(sliding_window=0), dict(logits_soft_cap=0.0)])
def test_layer_rejects_bad_settings(kw):
    with pytest.raises(ValueError):
        Attention(8, 16, SpyBackend(), **kw)


def test_llama_attention_uses_the_layer(checkpoint):
    from shardserve.models.base import ModelShard
    from shardserve.models.loader import load_model
    cfg = ModelConfig.from_path(str(checkpoint("mistral")), "float32", max_model_len=64)
    model, _ = load_model(cfg, ModelShard.whole(cfg.num_layers), TorchAttentionBackend(), "cpu")
    attn = model.model.layers[0].self_attn.attn
    assert isinstance(attn, Attention) and attn.sliding_window == cfg.hf_config.get("sliding_window")
    assert (attn.num_heads, attn.num_kv_heads, attn.logits_soft_cap) == (cfg.num_heads, cfg.num_kv_heads, None)


def test_factory_picks_by_device_and_env(monkeypatch):
    monkeypatch.delenv("SHARDSERVE_ATTENTION_BACKEND", raising=False)
    assert type(build_attention_backend(_model(), "cpu")) is TorchAttentionBackend
    monkeypatch.setenv("SHARDSERVE_ATTENTION_BACKEND", "triton")
    from shardserve.layers.attention.triton_backend import TritonAttentionBackend
    assert isinstance(build_attention_backend(_model(), "cpu"), TritonAttentionBackend)
    monkeypatch.setenv("SHARDSERVE_ATTENTION_BACKEND", "torch")
    assert type(build_attention_backend(_model(), "cuda")) is TorchAttentionBackend
    monkeypatch.setenv("SHARDSERVE_ATTENTION_BACKEND", "flash")
    with pytest.raises(ValueError, match="SHARDSERVE_ATTENTION_BACKEND"):
        build_attention_backend(_model(), "cpu")


def test_factory_checks_the_rank_local_head_layout():
    pstate = lambda tp: SimpleNamespace(tp=SimpleNamespace(world_size=tp))  # noqa: E731
    build_attention_backend(_model(8, 2), "cpu", pstate(4))  # 2 heads + 1 replicated KV head per rank
    build_attention_backend(_model(8, 2), "cpu", pstate(2))
    with pytest.raises(ValueError, match="KV heads per rank"):
        build_attention_backend(_model(6, 4), "cpu", pstate(2))  # 3 query heads over 2 KV heads
