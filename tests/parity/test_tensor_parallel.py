"""Tensor parallelism on CPU ranks (gloo, one process per rank): greedy tokens identical to tp = 1 and to
transformers, top-20 logprobs within 1e-4, seeded samples identical, each rank reads only its shard, and a killed
rank fails the request within seconds."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from checkpoints import ARCHS, References, assert_parity, engine_llm
from shardserve import LLM, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiproc")]

NEW_TOKENS = 16
SEEDED = SamplingParams(temperature=0.9, top_k=50, max_tokens=8, seed=42, ignore_eos=True)


def make_llm(path, tp: int, **kw) -> LLM:
    return engine_llm(path, tensor_parallel_size=tp, **kw)


def run_layout(path, prompts, **kw):
    llm = make_llm(path, **kw)
    try:
        greedy = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
            temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=20), use_tqdm=False)
        seeded = llm.generate(prompt_token_ids=prompts, sampling_params=SEEDED, use_tqdm=False)
        return greedy, [o.outputs[0].token_ids for o in seeded], llm.engine.get_stats()
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def references(checkpoint):
    return References(checkpoint, SEEDED, lengths=(1, 9, 33), new_tokens=NEW_TOKENS)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tp_matches_single_device_and_transformers(references, arch, tp):
    path, prompts, ref_tokens, ref_logits, ref_seeded = references(arch)
    greedy, seeded, _ = run_layout(path, prompts, tp=tp)
    assert_parity(greedy, seeded, ref_tokens, ref_logits, ref_seeded)


@pytest.mark.parametrize("disable", [False, True])
def test_disable_custom_all_reduce_routes_every_all_reduce_through_gloo(references, monkeypatch, disable):
    """--disable-custom-all-reduce: the same tokens, and the ranks' timed collectives show gloo, never shm
    (without it, the CPU ranks' all-reduces go through shared memory)."""
    monkeypatch.setenv("SHARDSERVE_COMM_TIMING", "1")  # inherited by the rank processes
    monkeypatch.delenv("SHARDSERVE_ALLREDUCE", raising=False)  # the default (auto) is what disable=False checks
    path, prompts, ref_tokens, ref_logits, ref_seeded = references("llama")
    greedy, seeded, stats = run_layout(path, prompts, tp=2, disable_custom_all_reduce=disable)
    assert_parity(greedy, seeded, ref_tokens, ref_logits, ref_seeded)
    calls = {impl: stats.get(f"executor_stage0_comm_tp_all_reduce_{impl}_calls", 0) for impl in ("shm", "gloo")}
    used, unused = ("gloo", "shm") if disable else ("shm", "gloo")
    assert calls[used] > 0 and calls[unused] == 0, calls


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_overlapped_row_parallel_layers_match_transformers(checkpoint, monkeypatch, arch):
    """--tp-overlap-chunks 4: a 470-token prefill step runs o_proj and down_proj as 3 row blocks each, whose gloo
    all-reduces overlap the next block's GEMM; tokens and logprobs as transformers, seeded samples as tp = 1."""
    monkeypatch.setenv("SHARDSERVE_COMM_TIMING", "1")
    refs = References(checkpoint, SEEDED, lengths=(300, 170), new_tokens=NEW_TOKENS)
    path, prompts, ref_tokens, ref_logits, ref_seeded = refs(arch)
    greedy, seeded, stats = run_layout(path, prompts, tp=2, tp_overlap_chunks=4, kv_cache_memory="16MiB")
    assert_parity(greedy, seeded, ref_tokens, ref_logits, ref_seeded)
    # one 470-token prefill (the second generate finds the prompts in the prefix cache) x 4 layers x 2 row-parallel
    # layers x 3 blocks
    assert stats.get("executor_stage0_comm_tp_all_reduce_async_gloo_calls", 0) == 4 * 2 * 3


def test_each_rank_reads_only_its_shard(checkpoint):
    path = checkpoint("llama")
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    llm = make_llm(path, 2)
    read = llm.engine.executor.bytes_read_per_rank
    llm.shutdown()
    assert len(read) == 2
    for r in read:  # everything but the tiny norms is split in two
        assert r < 0.55 * total, (r, total)
    assert sum(read) > 0.95 * total


def test_killed_worker_fails_request_within_10s(checkpoint):
    """A rank killed mid-decode fails the request within 10 s of the kill. The kill waits for decoding to be under
    way (a fixed delay raced the CPU decode kernels, which can finish all 2000 tokens before it)."""
    path = checkpoint("llama")
    llm = make_llm(path, 2, max_model_len=512)
    victim = llm.engine.executor.procs[1]
    killed_at: list[float] = []

    def kill_once_decoding() -> None:
        deadline = time.monotonic() + 60
        while llm.engine.stats["generation_tokens"] < 40 and time.monotonic() < deadline:
            time.sleep(0.002)
        killed_at.append(time.monotonic())
        os.kill(victim.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_once_decoding, daemon=True)
    killer.start()
    with pytest.raises(RuntimeError, match="exited|raised|failure"):
        llm.generate(prompt_token_ids=[[5] * 8] * 4, sampling_params=SamplingParams(
            temperature=0, max_tokens=500, ignore_eos=True), use_tqdm=False)
    elapsed = time.monotonic() - killed_at[0]
    killer.join(5)
    llm.shutdown()
    assert elapsed < 10, elapsed


def test_impossible_layouts_are_refused(checkpoint):
    from shardserve.config import ConfigError
    path = checkpoint("llama")  # 4 heads, 2 KV heads: tp 3 splits them unevenly (test_uneven_tp.py), 5 cannot
    with pytest.raises((ConfigError, ValueError), match="num_attention_heads"):
        make_llm(path, 5)


def test_rank_start_up_error_is_reported(checkpoint, tmp_path):
    """A rank that cannot load its shard makes start-up fail with that rank's own error, not a hang."""
    import shutil
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint("llama"), bad)
    weights = load_file(bad / "model.safetensors")
    del weights["model.layers.3.mlp.down_proj.weight"]
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match="rank \\d failed with ValueError: checkpoint is missing weights"):
        make_llm(bad, 2)


def test_two_engines_on_one_host_do_not_collide(checkpoint):
    path = checkpoint("llama")
    a, b = make_llm(path, 2), make_llm(path, 2)
    try:
        p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        out_a = a.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=p, use_tqdm=False)
        out_b = b.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=p, use_tqdm=False)
        assert out_a[0].outputs[0].token_ids == out_b[0].outputs[0].token_ids
        assert a.engine.executor.requests.name != b.engine.executor.requests.name
    finally:
        a.shutdown()
        b.shutdown()
