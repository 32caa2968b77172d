"""The GPU code path as a whole, on CPU: the Triton attention backend (paged decode + paged prefill) and the fused
RMSNorm / rotary / SiLU-and-mul kernels inside the real model, run by the Triton interpreter, against transformers.
Chunked prefill after a cached prefix (16-token budget) goes through the prefill kernel's prefix path. Where a GPU
is present the same test runs the compiled kernels on CUDA."""
from __future__ import annotations

import pytest
import torch

from checkpoints import ARCHS, hf_greedy, prompts_for
from shardserve import LLM, SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_triton_kernels_in_the_model_match_transformers(checkpoint, arch, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_ATTENTION_BACKEND", "triton")
    monkeypatch.setenv("SHARDSERVE_FUSED_KERNELS", "1")
    path = checkpoint(arch)
    prompts = prompts_for(ARCHS[arch][1].get("vocab_size", 1000), lengths=(1, 9, 30))
    ref = hf_greedy(path, prompts, 6)
    kw = dict(device=DEVICE, dtype="float32", use_tqdm_on_load=False, max_num_batched_tokens=16, max_num_seqs=4)
    if DEVICE == "cpu":
        kw["kv_cache_memory"] = "2MiB"
    else:
        kw.update(gpu_memory_utilization=0.3, enforce_eager=True)
    from shardserve.layers import fused_kernels
    calls = {}
    for name in ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding"):
        def spy(*a, _f=getattr(fused_kernels, name), _n=name):
            calls[_n] = calls.get(_n, 0) + 1
            return _f(*a)
        monkeypatch.setattr(fused_kernels, name, spy)
    llm = LLM(model=str(path), **kw)
    from shardserve.layers.attention.triton_backend import TritonAttentionBackend
    assert isinstance(llm.engine.executor.worker.backend, TritonAttentionBackend)
    outs = llm.generate(prompt_token_ids=prompts, use_tqdm=False,
                        sampling_params=SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert set(calls) == {"rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding"}, calls
    llm.shutdown()
