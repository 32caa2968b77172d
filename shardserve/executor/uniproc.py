"""World size 1: the single worker runs in the engine's own process (started by the same bootstrap as any rank)."""
from __future__ import annotations

import threading
from typing import Any

import torch

from shardserve.config import EngineConfig
from shardserve.executor.base import Executor, ExecutorError
from shardserve.step import ModelRunnerOutput, SchedulerOutput
from shardserve.worker.bootstrap import RankSpec, bootstrap_worker


class UniprocExecutor(Executor):
    def __init__(self, cfg: EngineConfig, eos_token_ids: list[int], progress: bool = False) -> None:
        super().__init__(cfg, eos_token_ids, progress)
        spec = RankSpec(rank=0, world_size=1, config=cfg, layer_ranges=[(0, cfg.model.num_layers)],
                        eos_token_ids=eos_token_ids, progress=progress)
        self.worker = bootstrap_worker(spec)
        self._dead: str | None = None
        self.initialize_cache()

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if self._dead:
            raise ExecutorError(self._dead)
        result = self.worker.execute(sched)
        assert result is not None
        return result

    def collective_rpc(self, method: str, *args: Any, ranks: list[int] | None = None,
                       timeout: float | None = None) -> list[Any]:
        """In this process. With a timeout the call runs on a helper thread, so a stalled method fails the call
        (and this executor: its state is no longer trusted) instead of blocking the caller forever."""
        if self._dead:
            raise ExecutorError(self._dead)
        if not self.rpc_targets(method, ranks):
            return []
        if timeout is None:
            try:
                return [self.worker.call(method, args)]
            except Exception as e:
                raise ExecutorError(f"collective_rpc({method!r}) failed: rank 0 failed with {type(e).__name__}: {e}") from e
        box: dict[str, Any] = {}
        device = torch.device(self.cfg.device)

        def run() -> None:
            try:
                if device.type == "cuda":
                    torch.cuda.set_device(device)  # the current device is per thread
                box["result"] = self.worker.call(method, args)
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                box["error"] = e

        t = threading.Thread(target=run, name=f"rpc-{method}", daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            self._dead = f"rank 0 did not answer collective_rpc({method!r}) within {timeout:g} s"
            raise ExecutorError(self._dead)
        if "error" in box:
            e = box["error"]
            raise ExecutorError(f"collective_rpc({method!r}) failed: rank 0 failed with {type(e).__name__}: {e}") from e
        return [box["result"]]

    def shutdown(self) -> None:
        if self._dead is None:
            self.write_trace()
        self.worker.close()
