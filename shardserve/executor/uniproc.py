"""World size 1: the single worker runs in the engine's own process."""
from __future__ import annotations

from shardserve.config import EngineConfig
from shardserve.distributed.parallel_state import single_process_state
from shardserve.engine.sequence import ModelRunnerOutput, SchedulerOutput
from shardserve.executor.base import Executor
from shardserve.worker.worker import Worker


class UniprocExecutor(Executor):
    def __init__(self, cfg: EngineConfig, eos_token_ids: list[int], progress: bool = False) -> None:
        super().__init__(cfg, eos_token_ids, progress)
        import torch
        pstate = single_process_state(torch.device(cfg.device))
        self.worker = Worker(cfg, pstate, (0, cfg.model.num_layers), eos_token_ids, progress)
        self.num_blocks = self.worker.determine_num_blocks()
        self.block_bytes = self.worker.kv_block_bytes()
        self.worker.init_cache(self.num_blocks)

    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        result = self.worker.execute(out)
        assert result is not None
        return result

    def shutdown(self) -> None:
        self.worker.close()
        if self.cfg.parallel.trace_file:
            from pathlib import Path
            from shardserve.utils.trace import merge_traces
            merge_traces([Path(f"{self.cfg.parallel.trace_file}.rank0")], self.cfg.parallel.trace_file)
