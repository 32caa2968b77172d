"""Engine behaviour on one device: batching invariance, prefix caching, preemption, seeds, stops, abort, bad config."""
from __future__ import annotations

import pytest

from checkpoints import prompts_for
from shardserve import LLM, SamplingParams
from shardserve.config import ConfigError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def make_llm(path, **kw) -> LLM:
    kw.setdefault("kv_cache_memory", "2MiB")
    kw.setdefault("dtype", "float32")
    return LLM(model=str(path), device="cpu", use_tqdm_on_load=False, **kw)


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def llama(checkpoint):
    return checkpoint("llama")


@pytest.fixture(scope="module")
def llm(llama):
    llm = make_llm(llama)
    yield llm
    llm.shutdown()


def test_batch_equals_alone(llm):
    prompts = prompts_for(1000, lengths=(3, 70, 9, 33, 1, 120))
    alone = [tokens(llm.generate(prompt_token_ids=[p], sampling_params=GREEDY, use_tqdm=False))[0] for p in prompts]
    assert tokens(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)) == alone


def test_prefix_caching_on_off_same_tokens(llama):
    shared = prompts_for(1000, lengths=(48,), seed=7)[0]
    prompts = [shared + t for t in prompts_for(1000, lengths=(5, 20, 1), seed=8)]
    with_cache = make_llm(llama, enable_prefix_caching=True)
    first = tokens(with_cache.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False))
    again = tokens(with_cache.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False))
    bm = with_cache.engine.scheduler.block_manager
    assert bm.prefix_cache_hits > 0
    without = make_llm(llama, enable_prefix_caching=False)
    assert tokens(without.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)) == first
    assert again == first


def test_preemption_by_recompute_keeps_tokens(llama, llm):
    prompts = prompts_for(1000, lengths=(40, 35, 44, 30), seed=3)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = tokens(llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False))
    # 1 KiB of KV per token → 16 KiB per block; 8 blocks = 128 tokens < 4 × ~80 needed
    tiny = make_llm(llama, kv_cache_memory=8 * 16 * 1024, max_model_len=128)
    got = tokens(tiny.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False))
    assert tiny.engine.scheduler.num_preemptions > 0
    assert got == ref


def test_chunked_prefill_small_budget_same_tokens(llama, llm):
    prompts = prompts_for(1000, lengths=(100, 7, 64), seed=4)
    ref = tokens(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False))
    small = make_llm(llama, max_num_batched_tokens=16)
    assert tokens(small.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)) == ref


def test_seeded_sampling_reproduces_across_batches(llm):
    prompts = prompts_for(1000, lengths=(6, 13, 2), seed=5)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    alone = tokens(llm.generate(prompt_token_ids=[prompts[1]], sampling_params=seeded, use_tqdm=False))[0]
    other = SamplingParams(temperature=0.7, max_tokens=10, ignore_eos=True)
    batch = llm.generate(prompt_token_ids=prompts, sampling_params=[other, seeded, other], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    diff = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=99, ignore_eos=True)
    assert tokens(llm.generate(prompt_token_ids=[prompts[1]], sampling_params=diff, use_tqdm=False))[0] != alone


def test_n_samples_differ_and_are_reproducible(llm):
    p = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True)
    a = llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=p, use_tqdm=False)[0]
    b = llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=p, use_tqdm=False)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_stop_token_ids_and_stop_strings(llm):
    prompt = prompts_for(1000, lengths=(8,), seed=6)[0]
    ref = tokens(llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY, use_tqdm=False))[0]
    stop_id = ref[4]
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        temperature=0, max_tokens=12, stop_token_ids=[stop_id], ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[: ref.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    full = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY, use_tqdm=False)[0].outputs[0].text
    stop_str = full[len(full) // 2: len(full) // 2 + 2]
    assert stop_str.strip(), full
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        temperature=0, max_tokens=12, stop=[stop_str], ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_str
    assert out.text == full[: full.index(stop_str)]
    assert stop_str not in out.text


def test_max_tokens_min_tokens_and_length(llm):
    out = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(
        temperature=0, max_tokens=5, min_tokens=5), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_logprobs_and_prompt_logprobs(llm):
    p = SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    out = llm.generate(prompt_token_ids=[[9, 8, 7, 6, 5]], sampling_params=p, use_tqdm=False)[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 4
    for tok, lp in zip(out.outputs[0].token_ids, lps):
        assert lp["token_id"] == tok and lp["rank"] == 1 and len(lp["top_token_ids"]) == 3
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == 5
    assert [e["token_id"] for e in out.prompt_logprobs[1:]] == [8, 7, 6, 5]


def test_abort_frees_every_block(llm):
    engine = llm.engine
    bm = engine.scheduler.block_manager
    start = bm.num_free_blocks
    for i, p in enumerate(prompts_for(1000, lengths=(30, 50, 70), seed=9)):
        engine.add_request(f"abort-{i}", params=SamplingParams(max_tokens=50, ignore_eos=True), prompt_token_ids=p)
    for _ in range(3):
        engine.step()
    assert bm.num_free_blocks < start
    for i in range(3):
        engine.abort_request(f"abort-{i}")
    assert not engine.has_unfinished_requests()
    assert bm.num_free_blocks == start
    engine.step()  # the next step reports the aborted seqs to the workers and schedules nothing


def test_chat_and_text_prompts_on_the_builtin_model(tiny_model):
    llm = make_llm(tiny_model, kv_cache_memory="64MiB", max_model_len=256)
    out = llm.chat([{"role": "user", "content": "hi there"}], SamplingParams(max_tokens=3), use_tqdm=False)[0]
    assert "<|im_start|>user" in out.prompt and "hi there" in out.prompt
    assert 1 <= len(out.outputs[0].token_ids) <= 3
    text = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    assert text.prompt_token_ids == tok.encode("The quick brown fox")
    assert text.outputs[0].text == tok.decode(text.outputs[0].token_ids, skip_special_tokens=True)
    llm.shutdown()


def test_bad_requests_raise_value_error(llm):
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate(prompt_token_ids=[[1] * 600], sampling_params=GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate(prompt_token_ids=[[1, 5000]], sampling_params=GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate(prompt_token_ids=[[1, 2]], sampling_params=SamplingParams(max_tokens=511), use_tqdm=False)


def test_bad_config_fails_at_start(llama, tmp_path):
    import json
    import shutil
    with pytest.raises(ConfigError, match="--dtype"):
        make_llm(llama, dtype="float8")
    with pytest.raises(ConfigError, match="max-model-len"):
        make_llm(llama, max_model_len=100000)
    with pytest.raises(ConfigError, match="KV cache holds 16 tokens.*at least 0.5MiB"):
        make_llm(llama, kv_cache_memory="16KiB")
    with pytest.raises(ConfigError, match="--tp-overlap-chunks must be 1..64"):
        make_llm(llama, tp_overlap_chunks=0)
    bad = tmp_path / "bad"
    shutil.copytree(llama, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="supported architectures: .*LlamaForCausalLM"):
        make_llm(bad)
    with pytest.raises(ConfigError, match="config.json"):
        make_llm(tmp_path / "nowhere")
