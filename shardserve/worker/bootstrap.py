"""A rank's start-up, apart from any message loop: given a `RankSpec`, pick the device, join the process groups,
load this rank's shard and return a ready `Worker` (its KV cache is then sized and allocated by the executor through
`collective_rpc("determine_num_blocks")` / `collective_rpc("init_cache", n)`, so every rank agrees on one size).

The shared-memory loop (`worker/main.py`) calls `bootstrap_worker`, the in-process executor too; any other launcher
(e.g. a Ray actor) can, with a spec it builds itself. A spec crosses processes as JSON (`to_dict` / `from_dict`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from shardserve.config import EngineConfig, engine_config_from_dict, engine_config_to_dict
from shardserve.distributed.parallel_state import build_parallel_state, init_distributed, single_process_state
from shardserve.worker.worker import Worker


@dataclass
class RankSpec:
    rank: int
    world_size: int
    config: EngineConfig
    layer_ranges: list[tuple[int, int]]        # [start, end) layers of every pipeline stage
    eos_token_ids: list[int] = field(default_factory=list)
    init_method: str | None = None             # torch.distributed rendezvous (tcp://...); None: world size 1
    threads: int | None = None                 # torch threads of this rank (None: leave as is)
    progress: bool = False                     # progress bar while loading

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "config": engine_config_to_dict(self.config),
                "layer_ranges": [list(r) for r in self.layer_ranges], "eos_token_ids": list(self.eos_token_ids),
                "init_method": self.init_method, "threads": self.threads, "progress": self.progress}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RankSpec":
        return cls(rank=int(d["rank"]), world_size=int(d["world_size"]), config=engine_config_from_dict(d["config"]),
                   layer_ranges=[(int(a), int(b)) for a, b in d["layer_ranges"]],
                   eos_token_ids=[int(t) for t in d["eos_token_ids"]], init_method=d.get("init_method"),
                   threads=d.get("threads"), progress=bool(d.get("progress", False)))


def bootstrap_worker(spec: RankSpec) -> Worker:
    """Device, process groups (tp/pp/ep, warmed up), this rank's shard of the model → a Worker without a KV cache."""
    cfg = spec.config
    if spec.threads:
        torch.set_num_threads(max(1, spec.threads))
    if spec.world_size == 1 and spec.init_method is None:
        pstate = single_process_state(torch.device(cfg.device))
        return Worker(cfg, pstate, spec.layer_ranges[0], spec.eos_token_ids, spec.progress)
    if spec.init_method is None:
        raise ValueError(f"rank {spec.rank} of {spec.world_size} needs an init_method to join its process group")
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{spec.rank % max(1, torch.cuda.device_count())}"
        torch.cuda.set_device(cfg.device)  # before any collective: NCCL and the custom all-reduce use it
    backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
    par = cfg.parallel
    init_distributed(spec.rank, spec.world_size, spec.init_method, backend, par.collective_timeout_s)
    own_allreduce = not par.disable_custom_all_reduce
    pstate = build_parallel_state(par.tensor_parallel_size, par.pipeline_parallel_size, 1, backend,
                                  torch.device(cfg.device), allreduce=None if own_allreduce else "gloo",
                                  custom_allreduce=own_allreduce)
    pstate.tp.overlap_chunks = par.tp_overlap_chunks
    pstate.tp.warm_up()  # NCCL communicators exist before the KV cache is sized from the free memory
    pstate.pp.warm_up(p2p=True)
    layer_range = spec.layer_ranges[pstate.pp.rank_in_group]
    return Worker(cfg, pstate, layer_range, spec.eos_token_ids, spec.progress)
