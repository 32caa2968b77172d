"""The executor registry: each executor backend by name (`uni`, `mp`, ...), where its class lives, and what layouts
it runs. `ParallelConfig` validation and the CLI's `--distributed-executor-backend` choices are read from here, so
adding a backend (e.g. Ray) is one `register_executor` call. Implementations are imported only when chosen."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shardserve.config import EngineConfig
    from shardserve.executor.base import Executor


@dataclass(frozen=True)
class ExecutorSpec:
    name: str
    target: str             # "module:Class"
    help: str               # one line for --help
    max_world_size: int | None = None  # None: any tp x pp


_REGISTRY: dict[str, ExecutorSpec] = {}


def register_executor(name: str, target: str, help: str, max_world_size: int | None = None) -> None:
    """Make `--distributed-executor-backend NAME` run the class at `target` ("package.module:Class")."""
    _REGISTRY[name] = ExecutorSpec(name, target, help, max_world_size)


register_executor("uni", "shardserve.executor.uniproc:UniprocExecutor", "one rank in this process", max_world_size=1)
register_executor("mp", "shardserve.executor.multiproc:MultiprocExecutor", "one OS process per rank on this host")


def executor_names() -> list[str]:
    return list(_REGISTRY)


def executor_help() -> str:
    return "; ".join(f"{s.name}: {s.help}" for s in _REGISTRY.values())


def check_executor(name: str | None, world_size: int) -> str | None:
    """Why `name` cannot run a world of `world_size` ranks (None: it can)."""
    if name is None:
        return None
    spec = _REGISTRY.get(name)
    if spec is None:
        return (f"--distributed-executor-backend {name!r} is not supported; use one of: "
                f"{', '.join(_REGISTRY)} ({executor_help()})")
    if spec.max_world_size is not None and world_size > spec.max_world_size:
        others = [s.name for s in _REGISTRY.values() if s.max_world_size is None]
        return (f"--distributed-executor-backend {name} runs at most {spec.max_world_size} rank(s); use "
                f"{' or '.join(repr(o) for o in others)} for tp x pp = {world_size}")
    return None


def default_executor(world_size: int) -> str:
    return "uni" if world_size == 1 else "mp"


def make_executor(cfg: EngineConfig, eos_token_ids: list[int], progress: bool = False) -> Executor:
    spec = _REGISTRY[cfg.parallel.executor]
    module, cls_name = spec.target.split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    return cls(cfg, eos_token_ids, progress)
