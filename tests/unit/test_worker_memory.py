"""How much of a GPU the KV cache gets (`gpu_kv_budget`), with the numbers a profiling run reads off the device."""
from shardserve.worker.worker import gpu_kv_budget

GiB = 1 << 30


def test_budget_is_the_utilization_share_minus_torch_peak_and_memory_outside_torch():
    # 80 GiB device, 90%: weights + activations peaked at 20 GiB inside torch; torch holds 22 GiB, the device has
    # 56 GiB free, so 2 GiB is outside torch (CUDA context, NCCL buffers)
    assert gpu_kv_budget(80 * GiB, 0.9, 20 * GiB, 22 * GiB, 56 * GiB) == int(72 * GiB - 20 * GiB - 2 * GiB)


def test_another_process_on_the_gpu_shrinks_the_budget():
    alone = gpu_kv_budget(80 * GiB, 0.9, 20 * GiB, 22 * GiB, 56 * GiB)
    shared = gpu_kv_budget(80 * GiB, 0.9, 20 * GiB, 22 * GiB, 46 * GiB)  # someone else took 10 GiB
    assert alone - shared == 10 * GiB


def test_budget_can_go_negative_and_never_counts_cached_blocks_twice():
    assert gpu_kv_budget(16 * GiB, 0.5, 10 * GiB, 12 * GiB, 3 * GiB) < 0  # the caller then gets 0 blocks
    # free memory reported above total - reserved (a driver rounding quirk) adds nothing
    assert gpu_kv_budget(10 * GiB, 1.0, 4 * GiB, 4 * GiB, 7 * GiB) == 6 * GiB


def test_profiling_reads_the_device_and_feeds_the_budget(monkeypatch):
    """Worker._profile_gpu_budget on fake device readings: the forward runs at the step's token budget, and the
    readings reach gpu_kv_budget in the right places (free from mem_get_info, peak allocated, reserved)."""
    from types import SimpleNamespace

    import torch

    from shardserve.worker.worker import Worker
    calls = []
    for name in ("empty_cache", "reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name: calls.append(_n))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (56 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 20 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 22 * GiB)
    cfg = SimpleNamespace(scheduler=SimpleNamespace(max_num_batched_tokens=2048),
                          model=SimpleNamespace(max_model_len=1024),
                          cache=SimpleNamespace(gpu_memory_utilization=0.9))
    fake = SimpleNamespace(cfg=cfg, device="cuda:0", has_moe=False,
                           _dummy_forward=lambda n: calls.append(("forward", n)))
    assert Worker._profile_gpu_budget(fake) == gpu_kv_budget(80 * GiB, 0.9, 20 * GiB, 22 * GiB, 56 * GiB)
    assert ("forward", 1024) in calls and calls.index("reset_peak_memory_stats") < calls.index(("forward", 1024))


def _cpu_worker(tiny_model, **sched):
    from shardserve.distributed.parallel_state import single_process_state
    from shardserve.engine.args import EngineArgs
    from shardserve.worker.worker import Worker
    cfg = EngineArgs(model=str(tiny_model), device="cpu", max_model_len=256, **sched).create_config(progress=False)
    return Worker(cfg, single_process_state(), (0, cfg.model.num_layers), [0])


def _fake_device(monkeypatch, worker, base: int):
    """Fake device readings whose torch peak is `base` plus the largest logits tensor compute_logits returned (the
    CPU keeps no allocator statistics); returns the list of logits row counts."""
    import torch
    rows: list[int] = []
    peak = [0]
    real = worker.model.compute_logits

    def compute_logits(hidden):
        out = real(hidden)
        rows.append(out.shape[0])
        peak[0] = max(peak[0], out.numel() * out.element_size())
        return out
    monkeypatch.setattr(worker.model, "compute_logits", compute_logits)
    for name in ("empty_cache", "reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: base + peak[0])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 20 * GiB)
    return rows, peak


def test_profiling_runs_the_lm_head_and_sampler_at_their_largest(tiny_model, monkeypatch):
    """The profiling step ends, on the last stage, with compute_logits over every token of the step (a prompt
    chunk asking for prompt logprobs) and over max_num_seqs sampled rows, and runs the sampler on the latter; the
    global RNG is left untouched."""
    import torch
    worker = _cpu_worker(tiny_model, max_num_batched_tokens=64, max_num_seqs=8)
    rows, _ = _fake_device(monkeypatch, worker, 1 * GiB)
    sampled = []
    from shardserve.layers import sampler as sampler_mod
    real_forward = sampler_mod.Sampler.forward
    monkeypatch.setattr(sampler_mod.Sampler, "forward",
                        lambda self, logits, meta: sampled.append(tuple(logits.shape)) or real_forward(self, logits, meta))
    state = torch.get_rng_state()
    worker._profile_gpu_budget()
    assert torch.equal(state, torch.get_rng_state())
    vocab = worker.cfg.model.vocab_size
    assert rows == [64, 8] and sampled == [(8, vocab)]


def test_a_large_logits_buffer_leaves_fewer_kv_blocks(tiny_model, monkeypatch):
    """The [tokens x vocab] fp32 logits of the profiling step count in the peak: a larger step budget (more prompt
    logprob rows) leaves fewer KV blocks, by the size of the larger logits tensor."""
    small = _cpu_worker(tiny_model, max_num_batched_tokens=32)
    _, peak_small = _fake_device(monkeypatch, small, 1 * GiB)
    blocks_small = small._profile_gpu_budget() // small.kv_block_bytes()  # determine_num_blocks on a GPU
    large = _cpu_worker(tiny_model, max_num_batched_tokens=256)
    _, peak_large = _fake_device(monkeypatch, large, 1 * GiB)
    blocks_large = large._profile_gpu_budget() // large.kv_block_bytes()
    vocab = large.cfg.model.vocab_size
    assert peak_small[0] == 32 * vocab * 4 and peak_large[0] == 256 * vocab * 4
    block = large.kv_block_bytes()
    assert blocks_small - blocks_large >= (peak_large[0] - peak_small[0]) // block - 1 > 0
