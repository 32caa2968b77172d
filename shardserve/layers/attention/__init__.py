"""Paged attention: the metadata every backend reads, and backend selection by device."""
from __future__ import annotations

from shardserve.layers.attention.base import AttentionBackend, AttentionMetadata


def get_attention_backend(device: str) -> AttentionBackend:
    from shardserve.layers.attention.torch_backend import TorchAttentionBackend
    return TorchAttentionBackend()


__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
