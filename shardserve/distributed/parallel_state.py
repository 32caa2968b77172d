"""The process mesh: torch.distributed start-up, one GroupCoordinator per group (world, tp, pp, dp, ep), and the
ParallelState that callers receive and pass explicitly (no mesh in globals).

Layout: world = dp x pp x tp with TP innermost, so TP peers are neighbouring ranks (same node):

    global rank = dp_rank * (pp_size * tp_size) + pp_rank * tp_size + tp_rank

    tp group: same (dp, pp), all tp      pp group: same (dp, tp), all pp
    dp group: same (pp, tp), all dp      ep group: same pp, all (dp, tp)  (experts span replicas x tp)

A group of one rank never touches torch.distributed, so world-1 engines (`single_process_state`) never start a
process group. The collectives themselves live in `group.py`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from shardserve.distributed.group import (GroupCoordinator, PendingSend, collective_stats, default_timeout,
                                          enable_collective_timing, set_default_timeout, wait_all)
from shardserve.distributed.shm_allreduce import close_all

__all__ = ["GroupCoordinator", "ParallelState", "PendingSend", "build_parallel_state", "collective_stats",
           "destroy_distributed", "enable_collective_timing", "init_distributed", "mesh_groups",
           "single_process_state", "wait_all"]


def init_distributed(rank: int, world_size: int, init_method: str, backend: str = "gloo",
                     timeout_s: float = 60.0) -> None:
    """Join the default process group (e.g. init_method=`tcp_init_method(host, port)`).

    `timeout_s` bounds every collective and point-to-point op on every group built from it, so a
    dead peer surfaces as an error instead of a hang.
    """
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized; call destroy_distributed() first")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    set_default_timeout(timeout_s)


def destroy_distributed() -> None:
    """Tear down every process group of this process (safe to call when none exists)."""
    close_all()  # shared-memory collectives of every group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    set_default_timeout(None)


@dataclass
class ParallelState:
    """Every group this rank belongs to; built once, then passed to whoever needs it."""

    world: GroupCoordinator
    tp: GroupCoordinator
    pp: GroupCoordinator
    dp: GroupCoordinator
    ep: GroupCoordinator

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def world_size(self) -> int:
        return self.world.world_size

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def tp_size(self) -> int:
        return self.tp.world_size

    @property
    def pp_size(self) -> int:
        return self.pp.world_size

    @property
    def dp_size(self) -> int:
        return self.dp.world_size

    @property
    def ep_size(self) -> int:
        return self.ep.world_size

    @property
    def tp_rank(self) -> int:
        return self.tp.rank_in_group

    @property
    def pp_rank(self) -> int:
        return self.pp.rank_in_group

    @property
    def dp_rank(self) -> int:
        return self.dp.rank_in_group

    @property
    def ep_rank(self) -> int:
        return self.ep.rank_in_group


def mesh_groups(tp_size: int, pp_size: int = 1, dp_size: int = 1) -> dict[str, list[list[int]]]:
    """Every group's global ranks for a dp x pp x tp mesh (TP innermost), per group name."""
    def g(d: int, p: int, t: int) -> int:
        return d * (pp_size * tp_size) + p * tp_size + t

    dps, pps, tps = range(dp_size), range(pp_size), range(tp_size)
    return {
        "world": [list(range(dp_size * pp_size * tp_size))],
        "tp": [[g(d, p, t) for t in tps] for d in dps for p in pps],
        "pp": [[g(d, p, t) for p in pps] for d in dps for t in tps],
        "dp": [[g(d, p, t) for d in dps] for p in pps for t in tps],
        "ep": [[g(d, p, t) for d in dps for t in tps] for p in pps],
    }


def build_parallel_state(tp_size: int, pp_size: int = 1, dp_size: int = 1, backend: str = "gloo",
                         device: torch.device | None = None, allreduce: str | None = None,
                         custom_allreduce: bool = True) -> ParallelState:
    """Build every group of the mesh (after `init_distributed`) and return this rank's view.

    Every rank creates every group in the same order, as torch.distributed.new_group requires;
    groups with the same ranks share one process group, and one-rank groups create none.
    `allreduce` (auto | gloo | shm, default $SHARDSERVE_ALLREDUCE or auto) picks the CPU fast path;
    `custom_allreduce` lets the tp and ep groups of CUDA ranks use the custom all-reduce where it can work
    (`--disable-custom-all-reduce` turns both fast paths off: allreduce="gloo", custom_allreduce=False).
    """
    if not dist.is_initialized():
        raise RuntimeError("call init_distributed() before build_parallel_state()")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if tp_size * pp_size * dp_size != world_size:
        raise ValueError(f"tp_size {tp_size} x pp_size {pp_size} x dp_size {dp_size} = "
                         f"{tp_size * pp_size * dp_size}, but the world has {world_size} ranks; "
                         "pick sizes whose product is the number of processes")
    if device is None:
        device = torch.device("cpu") if backend == "gloo" else torch.device(
            "cuda", torch.cuda.current_device())
    timeout_s = default_timeout()
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None
    default_backend = str(dist.get_backend())
    made: dict[tuple[int, ...], tuple[Any, Any]] = {}

    def process_groups(ranks: list[int]) -> tuple[Any, Any]:
        key = tuple(ranks)
        if len(ranks) > 1 and key not in made:
            if len(ranks) == world_size and default_backend == backend:
                device_pg = dist.group.WORLD
            else:
                device_pg = dist.new_group(ranks, timeout=timeout, backend=backend)
            if backend == "gloo":
                cpu_pg = device_pg
            elif len(ranks) == world_size and default_backend == "gloo":
                cpu_pg = dist.group.WORLD
            else:
                cpu_pg = dist.new_group(ranks, timeout=timeout, backend="gloo")
            made[key] = (device_pg, cpu_pg)
        return made.get(key, (None, None))

    mine: dict[str, GroupCoordinator] = {}
    for name, rank_lists in mesh_groups(tp_size, pp_size, dp_size).items():
        for ranks in rank_lists:
            device_pg, cpu_pg = process_groups(ranks)  # collective: every rank, every group
            if rank in ranks:
                mine[name] = GroupCoordinator(name, ranks, rank, device_pg, cpu_pg, device, allreduce)
    mine["tp"].init_custom_allreduce(custom_allreduce)  # collective within each tp group
    if mine["ep"].ranks == mine["tp"].ranks:  # one buffer serves both (their calls never interleave mid-kernel)
        mine["ep"].custom = mine["tp"].custom
    else:
        mine["ep"].init_custom_allreduce(custom_allreduce)
    return ParallelState(**mine)


def single_process_state(device: torch.device = torch.device("cpu")) -> ParallelState:
    """World 1: every group is this process alone; torch.distributed is never touched."""
    groups = {n: GroupCoordinator(n, [0], 0, device=device) for n in ("world", "tp", "pp", "dp", "ep")}
    return ParallelState(**groups)
