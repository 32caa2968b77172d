"""The Triton paged-decode kernel against the torch backend: under TRITON_INTERPRET=1 on CPU tensors here, and on
CUDA where a GPU is present (same test body)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
from paged import random_paged_cache  # noqa: E402
from shardserve.layers.attention.base import AttentionMetadata  # noqa: E402
from shardserve.layers.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from shardserve.layers.attention.triton_backend import paged_decode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(heads: int, kv_heads: int, dim: int, lens: list[int], block_size: int = 16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    cache, tables = random_paged_cache(lens, kv_heads, dim, block_size, dtype, DEVICE, g)
    q = torch.randn(len(lens), heads, dim, generator=g).to(DEVICE, dtype)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.int64), block_tables=tables,
                             seq_lens=lens, query_lens=[1] * len(lens),
                             seq_lens_tensor=torch.tensor(lens, device=DEVICE), num_decodes=len(lens),
                             block_size=block_size)
    return q, cache, meta


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 32), (8, 2, 64), (6, 2, 16), (4, 1, 24)])
@pytest.mark.parametrize("window", [None, 20])
def test_paged_decode_matches_torch_backend(heads, kv_heads, dim, window):
    lens = [1, 16, 17, 45, 3, 64]
    q, cache, meta = _case(heads, kv_heads, dim, lens)
    scale = dim ** -0.5
    want = torch.empty_like(q)
    TorchAttentionBackend._decode(q, want, cache, meta, scale, window)
    got = paged_decode(q, cache, meta.block_tables, meta.seq_lens_tensor, scale, window)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paged_decode_bf16_on_gpu():
    q, cache, meta = _case(32, 8, 128, [1, 100, 1000, 4095], dtype=torch.bfloat16)
    want = torch.empty_like(q)
    TorchAttentionBackend._decode(q, want, cache, meta, 128 ** -0.5, None)
    got = paged_decode(q, cache, meta.block_tables, meta.seq_lens_tensor, 128 ** -0.5)
    assert (got.float() - want.float()).abs().max().item() < 2e-2


def test_engine_with_triton_backend_matches_transformers(checkpoint, monkeypatch):
    """The whole engine with the Triton decode path (interpreted on CPU) gives transformers' greedy tokens."""
    from checkpoints import engine_llm, hf_greedy, prompts_for
    from shardserve import SamplingParams
    monkeypatch.setenv("SHARDSERVE_ATTENTION_BACKEND", "triton")
    path = checkpoint("mistral")  # GQA + sliding window
    prompts = prompts_for(1000, lengths=(3, 30))
    llm = engine_llm(path)
    from shardserve.layers.attention.triton_backend import TritonAttentionBackend
    assert isinstance(llm.engine.executor.worker.backend, TritonAttentionBackend)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 6)
