"""Parent-side launch of engine-core processes: the spec on stdin, torch threads, each replica's GPU slice."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

__all__ = ["launch_core", "replica_gpus", "core_threads"]


def core_threads(num_cores: int, reserve: int = 0) -> int:
    """torch threads per core process (one replica): the host's CPUs, less `reserve` (kept for the API process),
    shared out over the replicas; a multi-rank replica's executor splits its budget over its ranks."""
    return max(1, ((os.cpu_count() or 1) - reserve) // max(1, num_cores))


def replica_gpus(device: str, world: int, replica: int, visible: list[str]) -> str | None:
    """CUDA_VISIBLE_DEVICES for replica `replica` of an engine on `device` (resolved: cpu | cuda[:N]) with `world`
    = tp x pp ranks: its own GPUs, the replica-th slice of the `visible` ones, so replicas never share a GPU; None
    for CPU engines."""
    if not device.startswith("cuda"):
        return None
    mine = visible[replica * world:(replica + 1) * world]
    if len(mine) < world:
        from shardserve.config import ConfigError
        raise ConfigError(f"data-parallel replica {replica} needs GPUs {replica * world}..{(replica + 1) * world - 1} "
                          f"(tp x pp = {world} per replica) but {len(visible)} are visible; lower "
                          "--data-parallel-size or tp x pp, or make more GPUs visible")
    return ",".join(mine)


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def launch_core(engine_args: dict[str, Any], replica: int, port: int, token: str, threads: int,
                log_level: str | None = None) -> subprocess.Popen:
    """Start one engine-core process (`python -m shardserve.engine.core_proc`), which connects back to the
    loopback `port` and says hello with `token`. Its spec (plain JSON) goes on stdin, not the environment. A GPU
    replica sees only its own GPUs (`replica_gpus`)."""
    spec = {"engine_args": engine_args, "replica": replica, "port": port, "token": token, "threads": threads,
            "log_level": log_level or logging.getLevelName(logging.getLogger().getEffectiveLevel())}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env.pop("SHARDSERVE_API_KEY", None)  # the HTTP key is the API process's alone
    from shardserve.config import resolve_device
    device = resolve_device(str(engine_args.get("device") or "auto"))
    world = int(engine_args.get("tensor_parallel_size") or 1) * int(engine_args.get("pipeline_parallel_size") or 1)
    gpus = replica_gpus(device, world, replica, _visible_gpus() if device.startswith("cuda") else [])
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    proc = subprocess.Popen([sys.executable, "-m", "shardserve.engine.core_proc"], stdin=subprocess.PIPE, env=env)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    return proc
