"""Pipeline parallelism on CPU ranks: greedy tokens identical to transformers (and seeded samples identical to
tp = 1) for even, uneven, explicit, device-map, automatic and TP × PP layouts; several micro-batches in flight;
each stage loads only its layers; the Chrome trace has one track per rank."""
from __future__ import annotations

import json

import pytest

from checkpoints import References, assert_top_logprobs_close, engine_llm, prompts_for
from shardserve import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiproc")]

NEW_TOKENS = 16
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=8, seed=7, ignore_eos=True)
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=20)


make_llm = engine_llm


@pytest.fixture(scope="module")
def refs(checkpoint):
    # 8 prompts: pp=4 fills 4 micro-batches
    return References(checkpoint, SEEDED, lengths=(1, 9, 33, 4, 17, 2, 11, 3), new_tokens=NEW_TOKENS)


DEVICE_MAP = json.dumps({"model.embed_tokens": 0, "model.layers.0-1": 1, "model.layers.2-3": 2, "lm_head": 3})
LAYOUTS = {
    "pp2": dict(pipeline_parallel_size=2),
    "pp3-uneven": dict(pipeline_parallel_size=3),                              # 4 layers → [1, 2, 1]
    "pp3-explicit": dict(pipeline_parallel_size=3, pp_layer_partition="2,1,1"),
    "pp4-device-map": dict(pipeline_parallel_size=4, pp_partition=DEVICE_MAP),
    "pp2-auto": dict(pipeline_parallel_size=2, pp_partition="auto", max_per_device_memory="512MiB"),
    "tp2xpp2": dict(pipeline_parallel_size=2, tensor_parallel_size=2),
}


# every partition mode on Llama; Qwen3 (q/k norm, explicit head_dim) on the main layouts, to keep CI short
CASES = [("llama", layout) for layout in sorted(LAYOUTS)] + [("qwen3", "pp2"), ("qwen3", "pp3-uneven"),
                                                              ("qwen3", "tp2xpp2")]


@pytest.mark.parametrize("arch,layout", CASES)
def test_pp_matches_transformers(refs, arch, layout):
    path, prompts, ref_tokens, ref_logits, ref_seeded = refs(arch)
    llm = make_llm(path, trace_file=None, **LAYOUTS[layout])
    try:
        greedy = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
        seeded = llm.generate(prompt_token_ids=prompts, sampling_params=SEEDED, use_tqdm=False)
        in_flight = llm.engine.stats["max_in_flight_seen"]
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in greedy] == ref_tokens
    for o, logits in zip(greedy, ref_logits):
        assert_top_logprobs_close(o.outputs[0].logprobs[0], logits)
    assert [o.outputs[0].token_ids for o in seeded] == ref_seeded
    assert in_flight == LAYOUTS[layout]["pipeline_parallel_size"]  # several micro-batches were in flight


def test_stages_load_only_their_layers_and_trace(checkpoint, tmp_path):
    path = checkpoint("llama")
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    trace = tmp_path / "trace.json"
    llm = make_llm(path, pipeline_parallel_size=2, trace_file=str(trace))
    ex = llm.engine.executor
    read = ex.bytes_read_per_rank
    llm.generate(prompt_token_ids=prompts_for(1000, lengths=(5, 6, 7, 8)), sampling_params=SamplingParams(
        max_tokens=4, ignore_eos=True), use_tqdm=False)
    stats = llm.engine.get_stats()
    llm.shutdown()
    assert ex.layer_counts == [2, 2]
    assert all(r < 0.6 * total for r in read), (read, total)   # half the layers + embedding or head each
    assert stats["executor_stage0_compute_s"] > 0 and stats["executor_stage1_recv_s"] > 0
    events = json.loads(trace.read_text())["traceEvents"]
    spans = {(e["pid"], e["name"]) for e in events if e["ph"] == "X"}
    assert {(0, "compute"), (0, "send"), (1, "recv"), (1, "compute"), (1, "sample")} <= spans


def test_bad_partitions_are_refused(checkpoint):
    from shardserve.config import ConfigError
    path = checkpoint("llama")
    with pytest.raises(ConfigError, match="sums to 5"):
        make_llm(path, pipeline_parallel_size=2, pp_layer_partition="3,2")
    with pytest.raises(ConfigError, match="misses layer"):
        make_llm(path, pipeline_parallel_size=2, pp_partition='{"model.layers.0-2": 0, "lm_head": 1}')
    with pytest.raises(ConfigError, match="does not fit"):
        make_llm(path, pipeline_parallel_size=2, pp_partition="auto", max_per_device_memory=1000)
