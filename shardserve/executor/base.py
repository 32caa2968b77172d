"""The executor interface: the engine hands it a SchedulerOutput, it runs the step on every rank; and
`collective_rpc`, which runs a named worker method on every rank (or some) for everything that is not a step:
KV-cache sizing at start-up, MoE expert counts, trace events, whole-block KV reads and writes."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardserve.step import ModelRunnerOutput, SchedulerOutput

if TYPE_CHECKING:
    import torch

    from shardserve.config import EngineConfig


class ExecutorError(RuntimeError):
    """A rank failed, died or did not answer; the requests of the step in progress must be failed."""


class Executor(ABC):
    world_size = 1
    startup_timeout_s: float | None = None  # collective_rpc timeout while the KV cache is sized and allocated

    def __init__(self, cfg: EngineConfig, eos_token_ids: list[int], progress: bool = False) -> None:
        self.cfg = cfg
        self.eos_token_ids = eos_token_ids
        self.progress = progress
        self.num_blocks = 0
        self.block_bytes = 0  # KV bytes of one block on one rank
        self.last_result: ModelRunnerOutput | None = None

    # --- steps ---------------------------------------------------------------------------------------------
    @abstractmethod
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank and return the sampling rank's result (raises ExecutorError)."""

    def submit(self, sched: SchedulerOutput) -> None:
        """Start a step without waiting for it (pipelined executors keep several in flight)."""
        self._pending = self.execute_model(sched)

    def collect(self) -> ModelRunnerOutput:
        """Result of the oldest submitted step."""
        self.last_result = self._pending
        return self._pending

    @property
    def max_in_flight(self) -> int:
        return 1

    # --- everything else -----------------------------------------------------------------------------------
    @abstractmethod
    def collective_rpc(self, method: str, *args: Any, ranks: list[int] | None = None,
                       timeout: float | None = None) -> list[Any]:
        """Run `method` on every rank in `ranks` (default: all) and return their results in rank order.

        `method` names a public Worker method, or is "package.module:function", called as function(worker, *args).
        Arguments and results cross process boundaries msgpack-encoded (tensors included). A rank that raises fails
        the call with ExecutorError naming the rank and its exception; so does a rank that does not answer within
        `timeout` seconds (None: wait as long as it takes, still failing at once if a rank dies)."""

    def rpc_targets(self, method: str, ranks: list[int] | None) -> list[int]:
        """The ranks a call addresses, sorted and checked (None: all)."""
        targets = list(range(self.world_size)) if ranks is None else sorted({int(r) for r in ranks})
        bad = [r for r in targets if not 0 <= r < self.world_size]
        if bad:
            raise ExecutorError(f"collective_rpc({method!r}): ranks {bad} do not exist (world size {self.world_size})")
        return targets

    def initialize_cache(self) -> None:
        """Every rank proposes how many KV blocks it can hold; all allocate the smallest (one size for the engine)."""
        blocks = self.collective_rpc("determine_num_blocks", timeout=self.startup_timeout_s)
        self.num_blocks = min(blocks)
        self.block_bytes = self.collective_rpc("kv_block_bytes", ranks=[0])[0]
        self.collective_rpc("init_cache", self.num_blocks, timeout=self.startup_timeout_s)

    def stage_leaders(self) -> list[int]:
        """The first tp rank of every pipeline stage."""
        tp = self.cfg.parallel.tensor_parallel_size
        return [stage * tp for stage in range(self.cfg.parallel.pipeline_parallel_size)]

    @property
    def driver_rank(self) -> int:
        """The rank that returns sampled tokens: last stage, tp rank 0."""
        return self.stage_leaders()[-1]

    def stats(self) -> dict[str, float]:
        """Cumulative per-stage compute/sample/send/recv seconds (stage{i}_compute_s, ...) as of the last step."""
        return dict(self.last_result.timings) if self.last_result is not None else {}

    def expert_counts(self) -> dict[int, list[int]]:
        """MoE layer → tokens routed to each expert so far (every stage's layers)."""
        merged: dict[int, list[int]] = {}
        for counts in self.collective_rpc("expert_counts", ranks=self.stage_leaders()):
            merged.update({int(layer): c for layer, c in counts.items()})
        return merged

    def read_kv_blocks(self, block_ids: list[int]) -> list[torch.Tensor]:
        """Whole KV blocks from every rank, in rank order (each rank's own heads and layers; worker/kv_cache.py)."""
        return self.collective_rpc("read_kv_blocks", list(block_ids))

    def write_kv_blocks(self, block_ids: list[int], per_rank: list[torch.Tensor]) -> None:
        """Write what read_kv_blocks returned (of an engine of the same layout) into these blocks, rank by rank."""
        if len(per_rank) != self.world_size:
            raise ValueError(f"KV blocks for {len(per_rank)} ranks cannot be written to {self.world_size} ranks")
        for rank, blocks in enumerate(per_rank):
            self.collective_rpc("write_kv_blocks", list(block_ids), blocks, ranks=[rank])

    def write_trace(self) -> None:
        """With --trace-file: every rank's events merged into one Chrome trace (one track per rank)."""
        path = self.cfg.parallel.trace_file
        if path:
            from shardserve.utils.trace import write_trace
            events = [e for rank_events in self.collective_rpc("trace_events", timeout=30.0) for e in rank_events]
            write_trace(events, Path(path))

    def shutdown(self) -> None:
        pass
