"""Memory-bandwidth yardsticks for decode: the device's measured copy bandwidth, and the weight bytes one decode
step must read, so `bench latency` can say how close a batch-1 step gets to the memory limit (gpt-fast's measure:
weight bytes × tokens/s, as a share of what the memory system can move)."""
from __future__ import annotations

import time

import torch

from shardserve.planner.memory import ModelSpec, active_params


def copy_bandwidth_gbps(device: str, nbytes: int | None = None, iters: int = 10) -> float:
    """Best of `iters` device-to-device copies of an `nbytes` buffer, counted as read + write (2 × nbytes), GB/s.
    Defaults: 1 GiB on a GPU, 256 MiB on CPU (both far beyond the caches)."""
    nbytes = nbytes or (1 << 30 if device.startswith("cuda") else 1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    cuda = device.startswith("cuda")
    best = float("inf")
    for _ in range(iters + 1):  # the first copy warms up (page faults, clocks)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def device_name(device: str, cpu_name: str) -> str:
    """The GPU's name for a CUDA device, else the CPU description given."""
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name


def decode_weight_bytes(hf_config: dict, dtype: torch.dtype) -> int:
    """Bytes of weights one decode token reads: every active parameter, except the input embedding, of which a
    lookup reads one row (unless it is tied to the LM head, which reads it all)."""
    spec = ModelSpec.from_config(hf_config)
    params = active_params(spec)
    if not spec.tie_word_embeddings:
        params -= (spec.vocab_size - 1) * spec.hidden_size
    return params * torch.empty((), dtype=dtype).element_size()
