"""Paged attention: the metadata every backend reads, and backend selection by device.

cuda → the Triton backend when triton imports (decode kernel over the block table), else torch;
cpu → the torch backend. SHARDSERVE_ATTENTION_BACKEND=torch|triton overrides the choice."""
from __future__ import annotations

import os

from shardserve.layers.attention.base import AttentionBackend, AttentionMetadata


def get_attention_backend(device: str) -> AttentionBackend:
    choice = os.environ.get("SHARDSERVE_ATTENTION_BACKEND", "auto")
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"SHARDSERVE_ATTENTION_BACKEND={choice!r}; use auto, torch or triton")
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


__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
