"""Paged attention: the metadata every backend reads, the Attention layer models call, and the backend factory.

build_attention_backend(model, device, pstate) picks the backend for one rank from the model's config and the
rank's parallel state: cuda → the Triton backend when triton imports (paged decode and prefill kernels over the block
table), else torch; cpu → the torch backend. SHARDSERVE_ATTENTION_BACKEND=torch|triton|auto overrides the choice."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from shardserve.layers.attention.base import AttentionBackend, AttentionMetadata
from shardserve.layers.attention.layer import Attention
from shardserve.layers.tp_split import head_partition

if TYPE_CHECKING:  # types only: config.py imports the executor package at runtime
    from shardserve.config import ModelConfig
    from shardserve.distributed.parallel_state import ParallelState

BACKEND_ENV = "SHARDSERVE_ATTENTION_BACKEND"


def build_attention_backend(model: "ModelConfig", device: str,
                            pstate: "ParallelState | Any | None" = None) -> AttentionBackend:
    """The attention backend of one rank: `model` (its head layout and dtype), `device` ("cpu", "cuda", "cuda:N")
    and `pstate` (the rank's ParallelState, or anything with `.tp.world_size`; None = a single rank).

    Checks that the rank-local layout is one the kernels serve (this rank's query heads, from
    `tp_split.head_partition`, a multiple of its KV heads; ranks may hold different numbers of heads), then picks the
    backend (see the module docstring)."""
    tp_size = pstate.tp.world_size if pstate is not None else 1
    tp_rank = getattr(pstate.tp, "rank_in_group", 0) if pstate is not None else 0
    heads, kv_heads = model.num_heads, model.num_kv_heads
    if heads % kv_heads:
        raise ValueError(f"query heads per rank must group over the KV heads per rank, but num_attention_heads "
                         f"({heads}) is not a multiple of num_key_value_heads ({kv_heads}) (tp {tp_size})")
    part = head_partition(heads, kv_heads, tp_size, tp_rank)  # ValueError, saying why, when tp > heads
    if part.q_count % part.kv_count:  # cannot happen with a split by KV group; the kernels depend on it
        raise ValueError(f"{part.q_count} query heads on tp rank {tp_rank} do not group over {part.kv_count} KV "
                         f"heads per rank (num_attention_heads {heads}, num_key_value_heads {kv_heads}, tp {tp_size})")
    return _choose(device)


def _choose(device: str) -> AttentionBackend:
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"{BACKEND_ENV}={choice!r}; use auto, torch or triton")
    if choice == "triton" or (choice == "auto" and device.startswith("cuda") and _has_triton()):
        from shardserve.layers.attention.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend()
    from shardserve.layers.attention.torch_backend import TorchAttentionBackend
    return TorchAttentionBackend()


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["Attention", "AttentionBackend", "AttentionMetadata", "build_attention_backend"]
