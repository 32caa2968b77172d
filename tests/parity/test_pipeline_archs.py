"""Layouts against transformers on the architectures test_pipeline_parallel.py does not cover: pp = 2 on tied
embeddings (the LM head on the last stage reads the first stage's embedding), Mistral's sliding window (24, with
prompts of 33 and 40 tokens), Qwen2's q/k/v biases and Llama 3's rope scaling; and offline data-parallel replicas
(LLM(data_parallel_size=2)), compared with transformers directly, not only with the offline engine."""
from __future__ import annotations

import pytest

from checkpoints import ARCHS, assert_top_logprobs_close, engine_llm, hf_greedy, hf_last_logits, prompts_for
from shardserve import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiproc")]

NEW_TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=20)
LENGTHS = (1, 9, 33, 40)  # two prompts past Mistral's window of 24 (and past it again while decoding)


def vocab(arch: str) -> int:
    return ARCHS[arch][1].get("vocab_size", 1000)


@pytest.mark.parametrize("arch", ["tied", "mistral", "qwen2", "llama3"])
def test_pp2_matches_transformers(checkpoint, arch):
    path = checkpoint(arch)
    prompts = prompts_for(vocab(arch), lengths=LENGTHS)
    ref_tokens, ref_logits = hf_greedy(path, prompts, NEW_TOKENS), hf_last_logits(path, prompts)
    llm = engine_llm(path, pipeline_parallel_size=2)
    try:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
        layers = llm.engine.executor.layer_counts
    finally:
        llm.shutdown()
    assert layers == [2, 2]
    assert [o.outputs[0].token_ids for o in outs] == ref_tokens
    for o, logits in zip(outs, ref_logits):
        assert_top_logprobs_close(o.outputs[0].logprobs[0], logits)


def test_data_parallel_matches_transformers(checkpoint):
    arch = "qwen2"
    path = checkpoint(arch)
    prompts = prompts_for(vocab(arch), lengths=(3, 17, 8, 25))
    ref = hf_greedy(path, prompts, 8)
    llm = engine_llm(path, data_parallel_size=2)
    try:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
            temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        per_replica = llm.engine.requests_per_replica
    finally:
        llm.shutdown()
    assert all(k > 0 for k in per_replica), per_replica  # both replicas generated some of them
    assert [o.outputs[0].token_ids for o in outs] == ref
