"""The executor interface: the engine hands it a SchedulerOutput, it runs the step on every rank."""
from __future__ import annotations

from abc import ABC, abstractmethod

from shardserve.config import EngineConfig
from shardserve.engine.sequence import ModelRunnerOutput, SchedulerOutput


class ExecutorError(RuntimeError):
    """A rank failed or died; the requests of the step in progress must be failed."""


class Executor(ABC):
    def __init__(self, cfg: EngineConfig, eos_token_ids: list[int], progress: bool = False) -> None:
        self.cfg = cfg
        self.eos_token_ids = eos_token_ids
        self.progress = progress
        self.num_blocks = 0
        self.block_bytes = 0  # KV bytes of one block on one rank

    @abstractmethod
    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank and return the sampling rank's result (raises ExecutorError)."""

    def submit(self, out: SchedulerOutput) -> None:
        """Start a step without waiting for it (pipelined executors keep several in flight)."""
        self._pending = self.execute_model(out)

    def collect(self) -> ModelRunnerOutput:
        """Result of the oldest submitted step."""
        self.last_result = self._pending
        return self._pending

    last_result: ModelRunnerOutput | None = None

    def stats(self) -> dict[str, float]:
        """Cumulative per-stage compute/sample/send/recv seconds (stage{i}_compute_s, ...) as of the last step."""
        return dict(self.last_result.timings) if self.last_result is not None else {}

    def expert_counts(self) -> dict[int, list[int]]:
        """MoE layer → tokens routed to each expert so far (all stages)."""
        return dict(self.last_result.expert_counts) if self.last_result is not None else {}

    @property
    def max_in_flight(self) -> int:
        return 1

    def shutdown(self) -> None:
        pass


def make_executor(cfg: EngineConfig, eos_token_ids: list[int], progress: bool = False) -> Executor:
    if cfg.parallel.executor == "uni":
        if cfg.parallel.world_size != 1:
            from shardserve.config import ConfigError
            raise ConfigError("--distributed-executor-backend uni runs one rank only; use 'mp' for "
                              f"tp × pp = {cfg.parallel.world_size}")
        from shardserve.executor.uniproc import UniprocExecutor
        return UniprocExecutor(cfg, eos_token_ids, progress)
    from shardserve.executor.multiproc import MultiprocExecutor
    return MultiprocExecutor(cfg, eos_token_ids, progress)
