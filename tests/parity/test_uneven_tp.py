"""Tensor parallelism where the sizes do not divide by tp (layers/tp_split.py), on CPU ranks (gloo, one process per
rank): heads split by KV group, MLP columns and vocabulary split unevenly. Greedy tokens identical to transformers,
first-step top-20 logprobs within 1e-4, seeded samples identical to tp = 1, and each rank's KV cache sized for its
own KV heads.

Checkpoints (tests/checkpoints.py): "heads7" (7 heads, 7 KV heads), "heads7_mqa" (7 heads, 1 KV head), both with
intermediate 101 and vocab 1001; "smollm_shape" (SmolLM2's 9 heads / 3 KV heads, intermediate 1536, vocab 49152,
tied embeddings) at hidden 144."""
from __future__ import annotations

import pytest

from checkpoints import ARCHS, BASE, References, assert_parity, engine_llm
from shardserve import SamplingParams
from shardserve.layers.tp_split import head_partition

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiproc")]

NEW_TOKENS = 16
SEEDED = SamplingParams(temperature=0.9, top_k=50, max_tokens=8, seed=42, ignore_eos=True)
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=20)

LAYOUTS = [("heads7", 2), ("heads7", 3), ("heads7_mqa", 2), ("heads7_mqa", 3),
           ("smollm_shape", 2), ("smollm_shape", 3), ("smollm_shape", 4)]


@pytest.fixture(scope="module")
def references(checkpoint):
    return References(checkpoint, SEEDED, lengths=(1, 9, 33), new_tokens=NEW_TOKENS)


def _cfg(arch: str) -> dict:
    return {**BASE, **ARCHS[arch][1]}


def run(path, prompts, **kw):
    llm = engine_llm(path, **kw)
    try:
        greedy = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
        seeded = llm.generate(prompt_token_ids=prompts, sampling_params=SEEDED, use_tqdm=False)
        block_bytes = llm.engine.executor.collective_rpc("kv_block_bytes")
        return greedy, [o.outputs[0].token_ids for o in seeded], block_bytes
    finally:
        llm.shutdown()


def kv_heads_per_rank(arch: str, block_bytes: list[int], layers_per_rank: list[int], block_size: int = 16) -> list[int]:
    cfg = _cfg(arch)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return [b // (2 * n * head_dim * 4 * block_size) for b, n in zip(block_bytes, layers_per_rank)]


@pytest.mark.parametrize("arch,tp", LAYOUTS)
def test_uneven_tp_matches_transformers(references, arch, tp):
    path, prompts, ref_tokens, ref_logits, ref_seeded = references(arch)
    greedy, seeded, block_bytes = run(path, prompts, tensor_parallel_size=tp)
    assert_parity(greedy, seeded, ref_tokens, ref_logits, ref_seeded)
    cfg = _cfg(arch)
    want = [head_partition(cfg["num_attention_heads"], cfg["num_key_value_heads"], tp, r).kv_count for r in range(tp)]
    assert kv_heads_per_rank(arch, block_bytes, [cfg["num_hidden_layers"]] * tp) == want
    if arch == "smollm_shape" and tp == 2:
        assert want == [2, 1]  # one rank: 2 KV heads with their 6 query heads; the other: 1 with 3


def test_uneven_tp_with_pipeline_stages(references):
    """tp 2 x pp 2 on the 9 / 3 heads shape: 2 layers per stage, each stage split 6 + 3 query heads; the tied
    embedding is read by the first stage's embedding and the last stage's head, both vocab-parallel."""
    path, prompts, ref_tokens, ref_logits, ref_seeded = references("smollm_shape")
    greedy, seeded, block_bytes = run(path, prompts, tensor_parallel_size=2, pipeline_parallel_size=2)
    assert_parity(greedy, seeded, ref_tokens, ref_logits, ref_seeded)
    assert kv_heads_per_rank("smollm_shape", block_bytes, [2] * 4) == [2, 1, 2, 1]  # rank = stage * tp + tp rank


def test_more_ranks_than_query_heads_is_refused(checkpoint):
    from shardserve.config import ConfigError
    with pytest.raises(ConfigError, match=r"exceeds num_attention_heads \(7\).*at most 7"):
        engine_llm(checkpoint("heads7"), tensor_parallel_size=8)
