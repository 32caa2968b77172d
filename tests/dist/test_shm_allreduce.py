"""Shared-memory collectives on 2 and 4 CPU ranks: same results as gloo (bitwise equal across ranks), fallback,
buffer reuse, several groups and worlds at once, no /dev/shm leftovers, dead or stuck peers raise instead of hanging.

Spawning ranks dominates the run time, so each spawn runs many checks and the tests assert on its parts.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from launcher import RankFailure, run_ranks
from shardserve.distributed.parallel_state import (GroupCoordinator, build_parallel_state, collective_stats,
                                                   destroy_distributed, enable_collective_timing)
from shardserve.distributed.shm_allreduce import (SLOT_BYTES, ShmCollectiveError, ShmCollectiveTimeout,
                                                  shm_applies)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiproc")]

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64)
# odd sizes, a 0-d tensor, an empty one, and one of 2.4 chunks (the chunked path)
SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 5), (0, 4), (SLOT_BYTES * 12 // 20 + 3,)]


def _input(rank: int, shape: tuple[int, ...], dtype: torch.dtype, salt: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + salt)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=g, dtype=dtype)


def _fixed_order_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rank 0 + rank 1 + ... (half types accumulated in fp32 beyond 2 ranks): what shm must give, bit for bit."""
    if len(parts) > 2 and parts[0].dtype in (torch.float16, torch.bfloat16):
        acc = parts[0].float()
        for p in parts[1:]:
            acc = acc + p
        return acc.to(parts[0].dtype)
    out = parts[0] + parts[1]
    for p in parts[2:]:
        out = out + p
    return out


def _same(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{list(got.shape)}"
    assert torch.equal(got, want), f"{what}: values differ"


def _close(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    # (not torch.testing.assert_close: it imports torch.distributed.tensor and sympy, seconds per rank)
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{list(got.shape)}"
    tol = {torch.bfloat16: 3e-2, torch.float16: 3e-3}.get(got.dtype, 1e-5)
    err = (got.double() - want.double()).abs() - tol * (1 + want.double().abs())
    assert not err.numel() or err.max().item() <= 0, f"{what}: off by more than {tol} (relative)"


def _equivalence(g: GroupCoordinator, rank: int, world: int, shapes: list, salt: int = 0) -> dict:
    """all_reduce / all_gather / reduce_scatter through shm vs gloo vs a local fixed-order reference."""
    digests = {}
    for dtype in DTYPES:
        for shape in shapes:
            mine = _input(rank, shape, dtype, salt)
            parts = [_input(r, shape, dtype, salt) for r in range(world)]
            what = f"{dtype} {list(shape)}"
            g.allreduce_mode = "gloo"
            via_gloo = g.all_reduce(mine.clone())
            g.allreduce_mode = "shm"
            via_shm = g.all_reduce(mine.clone())
            assert g.last_impl == "shm", what
            _same(f"all_reduce {what} vs fixed order", via_shm, _fixed_order_sum(parts))
            _close(f"all_reduce {what} vs gloo", via_shm, via_gloo)
            digests[f"all_reduce {what}"] = via_shm
            for dim in range(-1, len(shape)) if shape else ():
                got = g.all_gather(mine, dim)
                _same(f"all_gather {what} dim={dim}", got, torch.cat(parts, dim=dim))
            if shape and shape[0]:
                rs_shape = (world * shape[0],) + shape[1:]
                rs_in = _input(rank, rs_shape, dtype, salt + 7)  # [world * s0, ...]
                got = g.reduce_scatter(rs_in, 0)
                want = _fixed_order_sum([_input(r, rs_shape, dtype, salt + 7) for r in range(world)])
                _same(f"reduce_scatter {what} vs fixed order", got, want.chunk(world, 0)[rank])
                g.allreduce_mode = "gloo"
                _close(f"reduce_scatter {what} vs gloo", got, g.reduce_scatter(rs_in, 0))
                g.allreduce_mode = "shm"
    flags = torch.tensor([True, False, True]) if rank else torch.tensor([False, False, True])
    _same("all_gather bool", g.all_gather(flags, 0), torch.cat([torch.tensor([False, False, True])]
                                                                  + [torch.tensor([True, False, True])] * (world - 1)))
    x = _input(rank, (5, 6), torch.float32).t()  # non-contiguous [6, 5]
    _same("all_reduce non-contiguous", g.all_reduce(x),
          _fixed_order_sum([_input(r, (5, 6), torch.float32).t() for r in range(world)]))
    return digests


def _two_ranks(rank: int, world: int, salt: int) -> dict:
    state = build_parallel_state(tp_size=world)
    g = state.tp
    out: dict = {"rank": rank, "digests": _equivalence(g, rank, world, SHAPES, salt)}
    name = g._shm._shm.name
    out["segment"] = name
    out["segment_visible"] = os.path.exists(f"/dev/shm/{name}")  # unlinked as soon as every rank attached

    # auto: shm up to shm_max_bytes per rank, gloo above it (same answer either way)
    g.allreduce_mode, g.shm_max_bytes = "auto", 4096
    small, big = torch.full((1024,), 1.0 + rank), torch.full((1025,), 1.0 + rank)
    assert g.all_reduce(small).eq(3.0).all() and g.last_impl == "shm"
    assert g.all_reduce(big).eq(3.0).all() and g.last_impl == "gloo"
    assert g.all_gather(torch.ones(2048), 0).shape == (4096,) and g.last_impl == "gloo"
    g.allreduce_mode = "gloo"
    g.all_reduce(small.clone())
    assert g.last_impl == "gloo"
    out["fallback"] = True

    # many back-to-back calls of mixed sizes: both buffer sets reused thousands of times
    g.allreduce_mode = "shm"
    enable_collective_timing(True)
    collective_stats(reset=True)
    for i in range(1500):
        n = (1, 33, 4096, 70_000)[i % 4]
        t = torch.full((n,), float(i + rank))
        assert g.all_reduce(t)[n - 1].item() == 2 * i + 1, f"all_reduce #{i}"
        if i % 3 == 0:
            gathered = g.all_gather(torch.full((n,), float(i * 10 + rank)), 0)
            assert gathered[n - 1].item() == i * 10 and gathered[-1].item() == i * 10 + 1, f"all_gather #{i}"
    stats = collective_stats()
    enable_collective_timing(False)
    out["timed_calls"] = stats.get("comm_tp_all_reduce_shm_calls", 0)
    out["timed_s"] = stats.get("comm_s", 0.0)
    out["back_to_back"] = True
    comm = g._shm
    destroy_distributed()  # closes the communicator; the launcher's own destroy is then a no-op
    out["closed"] = comm._shm is None
    return out


def _four_ranks(rank: int, world: int) -> dict:
    """Equivalence on 4 ranks, then tp=2 x pp=2: both tp groups, both pp groups and the world at once."""
    state = build_parallel_state(tp_size=world)
    digests = _equivalence(state.tp, rank, world, [(1,), (7,), (2, 3, 5)])
    state = build_parallel_state(tp_size=2, pp_size=2)
    tp, pp, wd = state.tp, state.pp, state.world
    for g in (tp, pp, wd):
        g.allreduce_mode = "shm"
    for i in range(300):
        a = tp.all_reduce(torch.full((9,), float(rank + i)))
        b = pp.all_reduce(torch.full((3, 3), float(10 * rank + i)))
        c = wd.all_gather(torch.tensor([rank * 1000 + i]), 0)
        assert a.eq(sum(r + i for r in tp.ranks)).all(), f"tp #{i}"
        assert b.eq(sum(10 * r + i for r in pp.ranks)).all(), f"pp #{i}"
        assert c.tolist() == [r * 1000 + i for r in range(4)], f"world #{i}"
    names = sorted({tp._shm._shm.name, pp._shm._shm.name, wd._shm._shm.name})
    return {"rank": rank, "digests": digests, "names": names, "impl": [tp.last_impl, pp.last_impl, wd.last_impl]}


def _dead_peer(rank: int, world: int) -> None:
    g = build_parallel_state(tp_size=world).tp
    g.allreduce_mode, g.timeout_s = "shm", 30.0  # long: a dead process must be noticed without the timeout
    g.all_reduce(torch.ones(4))
    if rank == 1:
        os._exit(3)
    t0 = time.monotonic()
    try:
        g.all_reduce(torch.ones(4))
    except ShmCollectiveError as e:
        raise AssertionError(f"EXPECTED {type(e).__name__} after {time.monotonic() - t0:.2f}s: {e}") from None
    raise AssertionError("all_reduce with a dead peer returned")


def _stuck_peer(rank: int, world: int) -> dict:
    g = build_parallel_state(tp_size=world).tp
    g.allreduce_mode, g.timeout_s = "shm", 0.5
    g.all_reduce(torch.ones(4))
    if rank == 1:
        time.sleep(2.0)  # alive but late: rank 0 times out, then marks the segment aborted
    t0 = time.monotonic()
    out: dict = {"rank": rank}
    try:
        g.all_reduce(torch.ones(4))
        out["error"] = None
    except ShmCollectiveError as e:
        out.update(error=f"{type(e).__name__}: {e}", timeout=isinstance(e, ShmCollectiveTimeout),
                   elapsed=time.monotonic() - t0)
    try:
        g.all_reduce(torch.ones(4))
        out["after"] = None
    except ShmCollectiveError as e:
        out["after"] = str(e)
    return out


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def two_worlds() -> list[list[dict]]:
    """Two independent 2-rank worlds running the 2-rank checks at the same time."""
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_ranks, _two_ranks, 2, salt, timeout=120) for salt in (0, 1)]
        return [f.result() for f in futures]


@pytest.fixture(scope="module")
def four() -> list[dict]:
    return run_ranks(_four_ranks, 4, timeout=120)


# ------------------------------------------------------------------------------------------------ tests


def test_matches_gloo_and_is_bitwise_equal_across_ranks(two_worlds, four):
    for results in two_worlds + [four]:
        first = results[0]["digests"]
        assert len(first) >= 12
        for r in results[1:]:
            assert r["digests"].keys() == first.keys()
            for k, v in first.items():
                if k.startswith("all_reduce"):
                    assert torch.equal(r["digests"][k], v), f"rank {r['rank']} differs from rank 0 on {k}"


def test_fallback_above_the_limit_and_in_gloo_mode(two_worlds):
    assert all(r["fallback"] for results in two_worlds for r in results)


def test_buffer_reuse_back_to_back_and_timing(two_worlds):
    for results in two_worlds:
        for r in results:
            assert r["back_to_back"] and r["timed_calls"] == 1500 and r["timed_s"] > 0


def test_concurrent_worlds_use_distinct_segments_and_leave_nothing(two_worlds):
    names = [r["segment"] for results in two_worlds for r in results]
    assert names[0] == names[1] and names[2] == names[3] and names[0] != names[2]
    for results in two_worlds:
        for r in results:
            assert not r["segment_visible"] and r["closed"]
    assert not [n for n in names if os.path.exists(f"/dev/shm/{n}")]


def test_two_groups_at_once_on_four_ranks(four):
    for r in four:
        assert r["impl"] == ["shm", "shm", "shm"]
        assert len(r["names"]) == 3  # tp, pp and world each have their own segment
    assert len({n for r in four for n in r["names"]}) == 2 + 2 + 1  # 2 tp groups, 2 pp groups, 1 world
    assert not [n for r in four for n in r["names"] if os.path.exists(f"/dev/shm/{n}")]


def test_dead_peer_raises_instead_of_hanging():
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_dead_peer, 2, timeout=60, grace_s=10)
    msg = str(info.value)
    assert "EXPECTED ShmCollectiveError" in msg and "rank 1 (pid" in msg and "exited" in msg, msg
    assert time.monotonic() - t0 < 30  # far below the 30 s collective timeout


def test_stuck_peer_times_out_and_the_other_side_learns_it():
    r0, r1 = run_ranks(_stuck_peer, 2, timeout=60)
    assert r0["timeout"] and "did not arrive within 0.5 s" in r0["error"] and r0["elapsed"] < 1.5, r0
    assert r0["after"] and "did not arrive" in r0["after"]  # broken for good: raises at once
    assert r1["error"] and "rank 0 gave up" in r1["error"] and not r1["timeout"], r1


def test_mode_from_argument_and_environment(monkeypatch):
    assert GroupCoordinator("tp", [0], 0).allreduce_mode == "auto"
    monkeypatch.setenv("SHARDSERVE_ALLREDUCE", "gloo")
    assert GroupCoordinator("tp", [0], 0).allreduce_mode == "gloo"
    assert GroupCoordinator("tp", [0], 0, allreduce="shm").allreduce_mode == "shm"
    monkeypatch.setenv("SHARDSERVE_ALLREDUCE", "fast")
    with pytest.raises(ValueError, match="SHARDSERVE_ALLREDUCE"):
        GroupCoordinator("tp", [0], 0)


def test_path_choice():
    t = torch.ones(16)
    assert shm_applies("auto", t, True, 64) and not shm_applies("auto", t, True, 63)
    assert shm_applies("shm", t, True, 0) and not shm_applies("gloo", t, True, 1 << 30)
    assert not shm_applies("shm", t.to(torch.complex64), True, 1 << 30)  # no sum for complex: gloo
    assert shm_applies("shm", t.to(torch.complex64), False, 1 << 30)  # all_gather moves bytes
    assert shm_applies("shm", t.bool(), False, 1 << 30) and not shm_applies("shm", t.bool(), True, 1 << 30)


def test_bench_comm_writes_nccl_tests_fields(tmp_path):
    import argparse
    import json

    from shardserve.bench import comm
    p = argparse.ArgumentParser()
    comm.add_args(p)
    out = tmp_path / "comm.json"
    args = p.parse_args(["-n", "2", "--backend", "shm,gloo", "--max-bytes", "4KiB", "--iters", "10", "--warmup", "1",
                         "--output-json", str(out)])
    assert comm.run(args) == 0
    rows = json.loads(out.read_text())["results"]
    ops = {(r["op"], r["backend"]) for r in rows}
    assert ops == {(op, b) for op in ("all_reduce", "all_gather", "reduce_scatter") for b in ("shm", "gloo")} \
        | {("send_recv", "gloo")}  # shm has no point-to-point path
    for r in rows:
        assert {"op", "backend", "ranks", "bytes", "latency_us", "algbw_gbps", "busbw_gbps"} <= r.keys()
        assert r["ranks"] == 2 and r["latency_us"] > 0
        assert r["algbw_gbps"] == pytest.approx(r["bytes"] / r["latency_us"] / 1e3)
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * comm.bus_factor(r["op"], 2))
        assert r["impl"] == ("gloo" if r["op"] == "send_recv" else r["backend"])
    assert sorted({r["bytes"] for r in rows if r["op"] == "all_reduce"}) == [4, 16, 64, 256, 1024, 4096]
