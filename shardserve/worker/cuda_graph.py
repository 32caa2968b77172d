"""CUDA graphs for decode steps: the model forward of a pure-decode batch is captured once per padded batch size
and replayed, so a step costs one graph launch instead of hundreds of kernel launches from Python.

A graph reads and writes fixed addresses, so every input lives in a static buffer sized for the largest batch
(token ids, positions, slot mapping, block tables, context lengths; hidden states and residual on a later pipeline
stage). A batch of n decodes runs the graph of the smallest captured size >= n; rows n.. are padding that writes its
K/V into a scratch slot of a KV block no sequence owns (the worker allocates it) and attends over that one slot.

Only attention backends whose decode path reads lengths from tensors can be captured (the Triton paged-decode
kernel loops up to each sequence's length on the device; the torch backend sizes its gathers from Python lists).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from shardserve.layers.attention import AttentionMetadata

Capture = Callable[[Callable[[], Any], Any], tuple[Callable[[], None], Any]]

MAX_GRAPH_BATCH = 512


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, then multiples of 8 up to max_batch (and max_batch itself): at most 7 rows of padding above 8."""
    sizes = [s for s in (1, 2, 4) if s <= max_batch] + list(range(8, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def capture_cuda(fn: Callable[[], Any], pool: Any) -> tuple[Callable[[], None], Any]:
    """Run `fn` once eagerly (kernels compile, cuBLAS sets up its handle and workspace for the stream), then capture
    it on that same side stream; returns (replay, outputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        out = fn()
    return graph.replay, out


def capture_eager(fn: Callable[[], Any], pool: Any = None) -> tuple[Callable[[], None], Any]:
    """The CPU stand-in for capture_cuda: 'replay' runs `fn` again on the same static buffers and copies its result
    into the first call's output tensors. It exercises everything around the graph (static inputs, padding, the
    scratch slot, output slicing) on machines without a GPU."""
    out = fn()

    def replay() -> None:
        new = fn()
        if isinstance(out, dict):
            for k, t in out.items():
                t.copy_(new[k])
        else:
            out.copy_(new)
    return replay, out


class DecodeGraphs:
    """Captured decode forwards of `model`, one per batch size in `sizes`, sharing one memory pool."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int, max_model_len: int,
                 scratch_block: int, sizes: list[int], device: torch.device, hidden_size: int, dtype: torch.dtype,
                 first_stage: bool = True, capture: Capture = capture_cuda) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sizes = sorted(sizes)
        self.max_batch = self.sizes[-1]
        self.first_stage = first_stage
        self.scratch_block = scratch_block
        n, width = self.max_batch, -(-max_model_len // block_size)
        i64 = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(n, **i64)
        self.positions = torch.zeros(n, **i64)
        self.slot_mapping = torch.full((n,), scratch_block * block_size, **i64)
        self.block_tables = torch.full((n, width), scratch_block, **i64)
        self.seq_lens = torch.ones(n, **i64)
        self.hidden = None if first_stage else torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.residual = None if first_stage else torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self._graphs: dict[int, tuple[Callable[[], None], Any]] = {}
        self.replays = 0
        pool = torch.cuda.graph_pool_handle() if capture is capture_cuda else None
        with torch.inference_mode():
            for bs in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool memory
                self._graphs[bs] = capture(lambda bs=bs: self._forward(bs), pool)

    def _forward(self, bs: int) -> Any:
        meta = AttentionMetadata(slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
                                 seq_lens=[1] * bs, query_lens=[1] * bs, seq_lens_tensor=self.seq_lens[:bs],
                                 num_decodes=bs, block_size=self.block_size)
        inter = None if self.first_stage else {"hidden_states": self.hidden[:bs], "residual": self.residual[:bs]}
        return self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches, meta, inter)

    def can_run(self, meta: AttentionMetadata) -> bool:
        n = len(meta.seq_lens)
        return 0 < n <= self.max_batch and meta.num_decodes == n

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            intermediate: dict[str, torch.Tensor] | None = None) -> Any:
        """Copy this step's inputs into the static buffers, pad, replay the graph; outputs sliced to the batch."""
        n = len(meta.seq_lens)
        bs = next(s for s in self.sizes if s >= n)
        if self.first_stage:
            self.input_ids[:n].copy_(input_ids)
        else:
            self.hidden[:n].copy_(intermediate["hidden_states"])
            self.residual[:n].copy_(intermediate["residual"])
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens_tensor[:n])
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables[:n])  # columns past a row's length are never read
        if bs > n:  # padding rows from an earlier, larger batch must not write into live cache slots
            self.slot_mapping[n:bs].fill_(self.scratch_block * self.block_size)
            self.block_tables[n:bs, 0].fill_(self.scratch_block)
            self.seq_lens[n:bs].fill_(1)
            self.positions[n:bs].zero_()
        replay, out = self._graphs[bs]
        replay()
        self.replays += 1
        if isinstance(out, dict):  # a stage's output goes to the next stage by an async send, which the next
            return {k: t[:n].clone() for k, t in out.items()}  # replay must not overwrite
        return out[:n]  # the last stage samples from it before the next replay
