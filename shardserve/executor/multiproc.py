"""One process per rank on this host: steps are broadcast over a shared-memory ring (msgpack), the driver rank
(last stage, first TP rank) returns sampled tokens on a second ring, and a dead rank fails the step within
seconds instead of hanging."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque

from shardserve.config import EngineConfig, engine_config_to_dict
from shardserve.distributed.message_queue import MessageQueue
from pathlib import Path

from shardserve.distributed.pipeline import layer_ranges, resolve_partition
from shardserve.engine.sequence import ModelRunnerOutput, SchedulerOutput
from shardserve.executor.base import Executor, ExecutorError
from shardserve.utils.network import get_free_port, get_loopback_ip, tcp_init_method
from shardserve.utils.trace import merge_traces

logger = logging.getLogger(__name__)

POLL_S = 0.05          # how often a waiting engine checks that every rank is alive
STARTUP_TIMEOUT_S = 300.0


class MultiprocExecutor(Executor):
    def __init__(self, cfg: EngineConfig, eos_token_ids: list[int], progress: bool = False) -> None:
        super().__init__(cfg, eos_token_ids, progress)
        par = cfg.parallel
        self.world_size = par.world_size
        tp, pp = par.tensor_parallel_size, par.pipeline_parallel_size
        self.layer_counts = resolve_partition(cfg)
        self.layer_ranges = layer_ranges(self.layer_counts)
        self.driver_rank = (pp - 1) * tp  # last stage, tp rank 0
        self.requests = MessageQueue.create(n_readers=self.world_size)
        self.results = MessageQueue.create(n_readers=1, reader_index=0)
        self._pending: deque[int] = deque()
        self._dead: str | None = None
        init_method = tcp_init_method(get_loopback_ip(), get_free_port())
        # the ranks share this process's thread budget (the whole host, or what a DP router gave this replica)
        import torch
        threads = max(1, torch.get_num_threads() // self.world_size)
        self._err_dir = tempfile.mkdtemp(prefix="shardserve-ranks-")
        self.procs: list[subprocess.Popen] = []
        for rank in range(self.world_size):
            spec = {"rank": rank, "world_size": self.world_size, "init_method": init_method,
                    "config": engine_config_to_dict(cfg), "requests": self.requests.handle(),
                    "results": self.results.handle(), "results_rank": self.driver_rank,
                    "layer_ranges": self.layer_ranges, "eos_token_ids": eos_token_ids, "threads": threads,
                    "error_file": os.path.join(self._err_dir, f"rank{rank}.err")}
            env = dict(os.environ, SHARDSERVE_WORKER_SPEC=json.dumps(spec), SHARDSERVE_RANK=str(rank),
                       OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
            self.procs.append(subprocess.Popen([sys.executable, "-m", "shardserve.worker.main"], env=env))
        try:
            ready = self._receive(STARTUP_TIMEOUT_S, what="start-up")
        except Exception:
            self.shutdown()
            raise
        self.num_blocks = ready["num_blocks"]
        self.block_bytes = ready["block_bytes"]
        self.bytes_read_per_rank: list[int] = ready["bytes_read"]
        self.load_ms_per_rank: list[int] = ready["load_ms"]

    # --- steps -------------------------------------------------------------------------------------------
    @property
    def max_in_flight(self) -> int:
        par = self.cfg.parallel
        return par.max_micro_batches or par.pipeline_parallel_size

    def submit(self, out: SchedulerOutput) -> None:
        self._check_alive()
        self.requests.enqueue({"type": "step", "out": out.to_dict()})
        self._pending.append(out.step_id)

    def collect(self) -> ModelRunnerOutput:
        self._pending.popleft()
        msg = self._receive(None, what="a step")
        self.last_result = ModelRunnerOutput.from_dict(msg["result"])
        return self.last_result

    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self.submit(out)
        return self.collect()

    def _receive(self, timeout: float | None, what: str) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                msg = self.results.dequeue(timeout=POLL_S)
            except TimeoutError:
                self._check_alive()
                if deadline is not None and time.monotonic() > deadline:
                    raise ExecutorError(f"workers did not finish {what} within {timeout:.0f} s")
                continue
            if "error" in msg:
                self._dead = "a worker raised:\n" + msg["error"]
                raise ExecutorError(self._dead)
            return msg

    def _check_alive(self) -> None:
        if self._dead:
            raise ExecutorError(self._dead)
        for rank, p in enumerate(self.procs):
            code = p.poll()
            if code is not None:
                self._dead = f"worker rank {rank} (pid {p.pid}) exited with code {code}{self._rank_error()}"
                raise ExecutorError(self._dead)

    def _rank_error(self) -> str:
        """The first error a rank recorded before dying (the root cause; others then fail in collectives)."""
        time.sleep(0.2)  # let a dying rank finish writing
        for rank in range(self.world_size):
            path = os.path.join(self._err_dir, f"rank{rank}.err")
            if os.path.isfile(path):
                with open(path) as f:
                    return f"; rank {rank} failed with {f.read().strip()}"
        return ""

    def shutdown(self) -> None:
        if not self.procs:
            return
        try:
            if self._dead is None:
                self.requests.enqueue({"type": "shutdown"}, timeout=1.0)
        except Exception:
            pass
        deadline = time.monotonic() + 5.0
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        if self.cfg.parallel.trace_file:
            merge_traces([Path(f"{self.cfg.parallel.trace_file}.rank{r}") for r in range(self.world_size)],
                         self.cfg.parallel.trace_file)
        self.requests.stop()
        self.requests.close()
        self.results.close()
        shutil.rmtree(self._err_dir, ignore_errors=True)

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass
