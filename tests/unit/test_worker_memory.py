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
