"""The multi-rank test harness itself: results in rank order, child tracebacks surface, hangs and crashes never hang."""

from __future__ import annotations

import os
import time

import pytest

from launcher import RankFailure, RankTimeout, run_ranks

# No torch at module level: children of the init=False tests start in a fraction of a second.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiproc")]


def _echo(rank: int, world_size: int, base: int, *, label: str) -> dict:
    return {"rank": rank, "world_size": world_size, "value": base + rank, "label": label,
            "pid": os.getpid()}


def _fails_on_rank_1(rank: int, world_size: int) -> None:
    from shardserve.distributed.parallel_state import build_parallel_state

    state = build_parallel_state(tp_size=world_size)
    if rank == 1:
        raise ValueError("boom from rank 1")
    state.world.barrier()  # rank 0 waits here for a peer that is gone: must be killed, not awaited


def _sleeps_forever(rank: int, world_size: int) -> None:
    if rank == 0:
        time.sleep(3600)


def _hard_exit(rank: int, world_size: int) -> None:
    os._exit(3 + rank)


def test_results_args_and_kwargs_in_rank_order():
    results = run_ranks(_echo, 3, 10, kwargs={"label": "x"}, init=False, timeout=30)
    assert [r["value"] for r in results] == [10, 11, 12]
    assert all(r["world_size"] == 3 and r["label"] == "x" for r in results)
    assert len({r["pid"] for r in results} | {os.getpid()}) == 4  # one fresh process per rank


def test_child_exception_becomes_failure_with_traceback():
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_fails_on_rank_1, 2, timeout=60, grace_s=1.0)
    text = str(info.value)
    assert "rank 1" in text and "ValueError: boom from rank 1" in text
    assert "_fails_on_rank_1" in text  # the child's own traceback lines
    assert time.monotonic() - t0 < 30  # rank 0 was killed after the grace period, not awaited


def test_hang_is_killed_with_stacks():
    t0 = time.monotonic()
    with pytest.raises(RankTimeout) as info:
        run_ranks(_sleeps_forever, 2, init=False, timeout=3)
    assert time.monotonic() - t0 < 10
    assert "_sleeps_forever" in str(info.value)  # faulthandler stack of the hung rank


def test_crash_without_result_is_reported():
    with pytest.raises(RankFailure, match="exited with code 3"):
        run_ranks(_hard_exit, 2, init=False, timeout=30)


def test_rejects_functions_spawn_cannot_import():
    def local(rank, world_size):
        return rank

    with pytest.raises(ValueError, match="module-level"):
        run_ranks(local, 2, init=False)
    with pytest.raises(ValueError, match="module-level"):
        run_ranks(lambda r, w: r, 2, init=False)
