"""Single-device parity with transformers: greedy tokens identical, logprobs (hence logits) within 1e-4 (fp32)."""
from __future__ import annotations

import pytest
import torch

from checkpoints import ARCHS, assert_top_logprobs_close, hf_greedy, hf_last_logits, prompts_for
from shardserve import LLM, SamplingParams

NEW_TOKENS = 16


def make_llm(path, **kw) -> LLM:
    kw.setdefault("kv_cache_memory", "2MiB")
    return LLM(model=str(path), dtype="float32", device="cpu", use_tqdm_on_load=False, **kw)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_tokens_and_logits_match_transformers(checkpoint, arch):
    path = checkpoint(arch)
    vocab = ARCHS[arch][1].get("vocab_size", 1000)
    prompts = prompts_for(vocab, lengths=(1, 5, 17, 40))
    ref = hf_greedy(path, prompts, NEW_TOKENS)
    llm = make_llm(path)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
        temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref

    # last-position logits: direct from the model, and as the top-20 logprobs the API returns
    ref_logits = hf_last_logits(path, prompts)
    model = llm.engine.executor.worker.model
    for p, ref_l in zip(prompts, ref_logits):
        got = _engine_last_logits(llm, p)
        assert (got - ref_l).abs().max().item() < 1e-4
    lp_outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
        temperature=0, max_tokens=1, logprobs=20), use_tqdm=False)
    for o, ref_l in zip(lp_outs, ref_logits):
        assert_top_logprobs_close(o.outputs[0].logprobs[0], ref_l)
    assert model is not None
    llm.shutdown()


def _engine_last_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    """Prefill `prompt` through the engine's own runner (paged cache) and return the last logits."""
    from shardserve.step import ScheduledSeq, SchedulerOutput
    worker = llm.engine.executor.worker
    runner = worker.runner
    bs = worker.cfg.cache.block_size
    nblocks = -(-len(prompt) // bs)
    top = worker.num_blocks  # blocks at the top of the cache: never handed out in these small tests
    item = ScheduledSeq(seq_id=10**9, token_ids=prompt, start_pos=0, block_table=list(range(top - nblocks, top)),
                        do_sample=False)
    inputs = runner.prepare_inputs(SchedulerOutput(seqs=[item], finished_seq_ids=[]))
    hidden = runner.forward(inputs)
    return worker.model.compute_logits(hidden[-1:])[0]
