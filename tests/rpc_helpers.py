"""Functions the collective_rpc tests run on ranks by name ("rpc_helpers:NAME"): each is called as fn(worker, *args)
inside the rank's process, which finds this module through PYTHONPATH."""
from __future__ import annotations

import time


def whoami(worker) -> dict:
    return {"rank": worker.rank, "tp": worker.pstate.tp.rank_in_group, "stage": worker.pstate.pp.rank_in_group}


def fail_on(worker, rank: int) -> int:
    if worker.rank == rank:
        raise RuntimeError(f"boom on rank {rank}")
    return worker.rank


def stall_on(worker, rank: int, seconds: float) -> int:
    if worker.rank == rank:
        time.sleep(seconds)
    return worker.rank
