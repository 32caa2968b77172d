"""Mixture-of-experts parity on CPU ranks against transformers random-weight Mixtral, Qwen2-MoE and Qwen3-MoE
checkpoints: tp = 1, tensor-parallel experts (tp = 2), expert parallelism (ep = 2 and 4, both placements) and
pp = 2 × ep = 2. Greedy tokens identical to transformers, top-20 logprobs within 1e-4 (fp32), seeded samples
identical to tp = 1, each rank reads about 1/world of the checkpoint, per-expert counts sum to tokens × top_k."""
from __future__ import annotations

import pytest

from checkpoints import (MOE_ARCHS, assert_top_logprobs_close, build_moe_checkpoint, hf_greedy, hf_last_logits,
                         moe_vocab, prompts_for)
from shardserve import LLM, SamplingParams

NEW_TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=20)
SEEDED = SamplingParams(temperature=0.9, top_k=50, max_tokens=8, seed=42, ignore_eos=True)

# Every architecture with TP experts (tp = 2) and at ep = 4; ep = 2 alone for Mixtral and Qwen3-MoE (both placements
# covered) and under pp = 2 for Mixtral and Qwen2-MoE. Ten multi-rank engine start-ups (5-10 s each here), so every
# layout runs all prompts in one generate call per sampling mode.
LAYOUTS = [
    ("mixtral", dict(tp=2)),
    ("mixtral", dict(tp=2, enable_expert_parallel=True)),
    ("mixtral", dict(tp=4, enable_expert_parallel=True, expert_placement="round_robin")),  # one expert per rank
    ("mixtral", dict(tp=2, enable_expert_parallel=True, pipeline_parallel_size=2)),  # one MoE layer per stage
    ("qwen2_moe", dict(tp=2)),
    ("qwen2_moe", dict(tp=4, enable_expert_parallel=True)),
    ("qwen2_moe", dict(tp=2, enable_expert_parallel=True, pipeline_parallel_size=2)),
    ("qwen3_moe", dict(tp=2)),
    ("qwen3_moe", dict(tp=2, enable_expert_parallel=True, expert_placement="round_robin")),
    ("qwen3_moe", dict(tp=4, enable_expert_parallel=True)),
]


def make_llm(path, tp: int = 1, **kw) -> LLM:
    kw.setdefault("kv_cache_memory", "2MiB")
    return LLM(model=str(path), dtype="float32", device="cpu", tensor_parallel_size=tp, use_tqdm_on_load=False, **kw)


def generate(llm: LLM, prompts):
    greedy = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    seeded = llm.generate(prompt_token_ids=prompts, sampling_params=SEEDED, use_tqdm=False)
    return greedy, [o.outputs[0].token_ids for o in seeded]


@pytest.fixture(scope="module")
def references(ckpt_root):
    """Per architecture: checkpoint, prompts, transformers greedy tokens and last logits, and a tp = 1 engine run
    (greedy outputs, seeded samples, per-expert counts of the greedy run)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            path = build_moe_checkpoint(ckpt_root, arch)
            prompts = prompts_for(moe_vocab(arch), lengths=(1, 9, 33))
            llm = make_llm(path)
            try:
                greedy = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
                counts = llm.engine.expert_counts()  # cumulative since start: the greedy run only
                seeded = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts,
                                                                       sampling_params=SEEDED, use_tqdm=False)]
            finally:
                llm.shutdown()
            cache[arch] = dict(path=path, prompts=prompts, hf_tokens=hf_greedy(path, prompts, NEW_TOKENS),
                               hf_logits=hf_last_logits(path, prompts), greedy=greedy, seeded=seeded, counts=counts)
        return cache[arch]
    return get


def check_greedy(greedy, ref) -> None:
    assert [o.outputs[0].token_ids for o in greedy] == ref["hf_tokens"]
    for o, logits in zip(greedy, ref["hf_logits"]):
        assert_top_logprobs_close(o.outputs[0].logprobs[0], logits)


@pytest.mark.parametrize("arch", sorted(MOE_ARCHS))
def test_single_device_matches_transformers_and_counts_routed_tokens(references, arch):
    ref = references(arch)
    check_greedy(ref["greedy"], ref)
    cfg = MOE_ARCHS[arch][1]
    top_k = cfg["num_experts_per_tok"]
    experts = cfg.get("num_local_experts") or cfg["num_experts"]
    layers = cfg.get("num_hidden_layers", 4)
    step, dense = cfg.get("decoder_sparse_step", 1), cfg.get("mlp_only_layers", [])
    assert sorted(ref["counts"]) == [i for i in range(layers) if (i + 1) % step == 0 and i not in dense]
    fed = sum(len(p) for p in ref["prompts"]) + len(ref["prompts"]) * (NEW_TOKENS - 1)  # the last token is not fed
    for layer, counts in ref["counts"].items():
        assert len(counts) == experts and sum(counts) == fed * top_k, (layer, counts)


@pytest.mark.slow
@pytest.mark.xdist_group("multiproc")
@pytest.mark.parametrize("arch,layout", LAYOUTS, ids=[
    f"{a}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for a, kw in LAYOUTS])
def test_layout_matches_transformers(references, arch, layout):
    ref = references(arch)
    llm = make_llm(ref["path"], **layout)
    try:
        greedy, seeded = generate(llm, ref["prompts"])
        read = llm.engine.executor.bytes_read_per_rank
        counts = llm.engine.expert_counts()  # every stage's layers, after greedy + seeded runs
    finally:
        llm.shutdown()
    check_greedy(greedy, ref)
    assert seeded == ref["seeded"]
    assert sorted(counts) == sorted(ref["counts"])  # the same MoE layers, from whichever stage holds them
    for layer, ref_counts in ref["counts"].items():  # the greedy run's routing, plus the seeded run's on top
        assert all(c >= r for c, r in zip(counts[layer], ref_counts)) and sum(counts[layer]) > sum(ref_counts)
    world = layout["tp"] * layout.get("pipeline_parallel_size", 1)
    total = sum(f.stat().st_size for f in ref["path"].glob("*.safetensors"))
    assert len(read) == world
    for r in read:  # experts: only this rank's (EP) or its slice of each (TP); attention/vocab: its shard
        assert r < 1.25 * total / world, (read, total)

