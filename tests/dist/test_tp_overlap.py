"""Overlapped row-parallel layers (--tp-overlap-chunks) on 2 CPU ranks: the row-block GEMMs with their async
all-reduces give the unsplit layer's result, with and without bias, and small steps are never split."""

from __future__ import annotations

import pytest
import torch

from launcher import run_ranks
from shardserve.distributed.group import OVERLAP_MIN_ROWS
from shardserve.distributed.parallel_state import build_parallel_state, collective_stats, enable_collective_timing
from shardserve.layers.linear import RowParallelLinear

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiproc")]

IN, OUT = 96, 40


def _layer(tp, bias: bool) -> RowParallelLinear:
    layer = RowParallelLinear(IN, OUT, bias=bias, tp=tp)
    g = torch.Generator().manual_seed(7)
    full_w, full_b = torch.randn(OUT, IN, generator=g), torch.randn(OUT, generator=g)
    shard = IN // tp.world_size
    layer.weight.data.copy_(full_w[:, tp.rank_in_group * shard:(tp.rank_in_group + 1) * shard])
    if bias:
        layer.bias.data.copy_(full_b)
    return layer


def _body(rank: int, world: int) -> dict:
    tp = build_parallel_state(tp_size=world, allreduce="gloo").tp
    enable_collective_timing()
    out = {}
    for bias in (False, True):
        layer = _layer(tp, bias)
        for rows in (5, 2 * OVERLAP_MIN_ROWS - 1, 4 * OVERLAP_MIN_ROWS + 3):
            g = torch.Generator().manual_seed(rows)
            x = torch.randn(rows, IN, generator=g)[:, rank * (IN // world):(rank + 1) * (IN // world)].contiguous()
            tp.overlap_chunks = 1
            plain = layer(x)
            tp.overlap_chunks = 3
            collective_stats(reset=True)
            split = layer(x)
            stats = collective_stats()
            out[f"{bias}_{rows}"] = {"plain": plain, "split": split, "chunks": tp.overlap_chunks_for(rows),
                                     "async_calls": stats.get("comm_tp_all_reduce_async_gloo_calls", 0)}
    # reduce_results=False (the MoE shared expert: summed into the block's one all-reduce): never split or reduced
    partial = _layer(tp, False)
    partial.reduce_results = False
    x = torch.randn(4 * OVERLAP_MIN_ROWS, IN // world, generator=torch.Generator().manual_seed(1))
    collective_stats(reset=True)
    out["partial"] = {"y": partial(x), "want": x @ partial.weight.t(), "stats": collective_stats()}
    return out


def test_overlapped_row_parallel_matches_the_unsplit_layer():
    results = run_ranks(_body, 2, timeout=120)
    partial = results[0].pop("partial")
    assert torch.equal(partial["y"], partial["want"]) and partial["stats"].get("comm_calls", 0) == 0
    results[1].pop("partial")
    for key, r in results[0].items():
        rows = int(key.split("_")[1])
        want_chunks = min(3, max(1, rows // OVERLAP_MIN_ROWS))
        assert r["chunks"] == want_chunks and r["async_calls"] == (want_chunks if want_chunks > 1 else 0), key
        assert r["split"].shape == (rows, OUT)
        assert torch.allclose(r["split"], r["plain"], atol=1e-5, rtol=1e-5), key
        assert torch.equal(r["split"], results[1][key]["split"]), f"{key}: ranks differ"
