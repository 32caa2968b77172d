"""Decode CUDA graphs: the padded-batch sizes, and the graph runner's static inputs, padding rows and scratch KV block
checked token for token against eager decoding. Here (no GPU) 'capture' is capture_eager, which replays the same
static-buffer forward; the real capture runs in the CUDA test at the end (same comparison, enforce_eager on/off)."""
from __future__ import annotations

import pytest
import torch

from checkpoints import engine_llm, prompts_for
from shardserve import SamplingParams
from shardserve.worker import cuda_graph, worker as worker_mod
from shardserve.worker.cuda_graph import capture_sizes


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(128)[-3:] == [112, 120, 128] and len(capture_sizes(128)) == 19


PARAMS = [SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
          SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=6, ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)]


def _generate(llm, prompts):
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=[PARAMS[i % 3] for i in range(len(prompts))],
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_graph_runner_matches_eager(arch, checkpoint, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_ATTENTION_BACKEND", "triton")  # the capturable decode path (interpreted here)
    path = checkpoint(arch)
    prompts = prompts_for(1000, lengths=(3, 17, 30, 5, 40), seed=1)  # 5 decodes → padded to 8, then fewer
    eager = engine_llm(path, max_num_seqs=8)
    ref = _generate(eager, prompts)
    eager.shutdown()

    monkeypatch.setattr(worker_mod.Worker, "use_graphs", property(lambda self: True))
    monkeypatch.setattr(worker_mod, "capture_cuda", cuda_graph.capture_eager)
    llm = engine_llm(path, max_num_seqs=8)
    worker = llm.engine.executor.worker
    graphs = worker.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8]
    assert graphs.scratch_block == worker.num_blocks  # the extra block the block manager never hands out
    assert worker.runner.kv_caches[0].shape[2] == worker.num_blocks + 1
    got = _generate(llm, prompts)
    assert got == ref
    assert graphs.replays > 0
    # a second round after shrinking batches: stale rows of bigger batches must not leak into the smaller ones
    assert _generate(llm, prompts[:2]) == _generate(llm, prompts[:2]) == ref[:2]
    llm.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_match_enforce_eager(checkpoint):
    from shardserve import LLM
    path = checkpoint("llama")
    prompts = prompts_for(1000, lengths=(3, 17, 30, 5, 40), seed=1)
    outs = []
    for eager in (True, False):
        llm = LLM(model=str(path), device="cuda", dtype="float32", max_num_seqs=8, enforce_eager=eager,
                  gpu_memory_utilization=0.3, use_tqdm_on_load=False)
        graphs = llm.engine.executor.worker.runner.graphs
        assert (graphs is None) == eager
        outs.append(_generate(llm, prompts))
        if not eager:
            assert graphs.replays > 0
        llm.shutdown()
    assert outs[0] == outs[1]


def test_pipeline_stage_graphs_match_eager(checkpoint, monkeypatch):
    """Two pipeline stages in one process, each with its own graphs: the first stage's outputs (hidden states and
    residual, cloned out of the graph's buffers) feed the second stage's static inputs; the final hidden states
    equal the whole model's eager decode, step after step with changing batch sizes."""
    monkeypatch.setenv("SHARDSERVE_ATTENTION_BACKEND", "triton")
    from shardserve.config import ModelConfig
    from shardserve.step import ScheduledSeq, SchedulerOutput
    from shardserve.layers.attention import build_attention_backend
    from shardserve.models.base import ModelShard
    from shardserve.models.loader import load_model
    from shardserve.worker.cuda_graph import DecodeGraphs, capture_eager
    from shardserve.worker.model_runner import ModelRunner

    cfg = ModelConfig.from_path(str(checkpoint("llama")), "float32", max_model_len=128)
    backend = build_attention_backend(cfg, "cpu")
    bs, blocks = 16, 40
    shards = [ModelShard(None, 0, 4), ModelShard(None, 0, 2, is_last_stage=False),
              ModelShard(None, 2, 4, is_first_stage=False)]
    runners = []
    for shard in shards:
        model, _ = load_model(cfg, shard, backend, "cpu")
        caches = [torch.zeros(backend.kv_cache_shape(blocks + 1, bs, 2, 16)) for _ in range(shard.num_local_layers)]
        runner = ModelRunner(model, caches, bs, "cpu", [], cfg.vocab_size, shard.is_last_stage)
        if shard.num_local_layers == 2:
            runner.graphs = DecodeGraphs(model, caches, bs, 128, blocks, [1, 2, 4], torch.device("cpu"),
                                         cfg.hidden_size, cfg.dtype, first_stage=shard.is_first_stage,
                                         capture=capture_eager)
        runners.append(runner)
    whole, first, second = runners
    lens = {0: 5, 1: 19, 2: 33}  # three sequences, blocks 0-2 / 3-5 / 6-8 (3 blocks each)
    g = torch.Generator().manual_seed(0)

    def step(seq_ids, prefill):
        items = [ScheduledSeq(seq_id=i, token_ids=torch.randint(0, 1000, (lens[i] if prefill else 1,),
                                                                generator=g).tolist(),
                              start_pos=0 if prefill else lens[i], block_table=[3 * i, 3 * i + 1, 3 * i + 2],
                              do_sample=False) for i in seq_ids]
        if not prefill:
            for i in seq_ids:
                lens[i] += 1
        out = SchedulerOutput(seqs=items, finished_seq_ids=[])
        ref = whole.forward(whole.prepare_inputs(out))
        mid = first.forward(first.prepare_inputs(out))
        return ref, second.forward(second.prepare_inputs(out), mid)

    step([0, 1, 2], prefill=True)
    for ids in ([0, 1, 2], [0, 1, 2], [1], [0, 2], [0, 1, 2]):  # batch 3 → graph 4 (one padding row), then 1, 2
        ref, got = step(ids, prefill=False)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert first.graphs.replays == second.graphs.replays == 5
