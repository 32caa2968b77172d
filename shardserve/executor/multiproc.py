"""One process per rank on this host: steps and collective_rpc calls are broadcast over a shared-memory ring
(msgpack), the driver rank (last stage, first TP rank) returns sampled tokens on a second ring, every rank answers
RPCs on a ring of its own, and a dead or silent rank fails the call within seconds instead of hanging."""
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
from typing import Any

from shardserve.config import EngineConfig
from shardserve.distributed.message_queue import MessageQueue
from shardserve.distributed.pipeline import layer_ranges, resolve_partition
from shardserve.executor.base import Executor, ExecutorError
from shardserve.step import ModelRunnerOutput, SchedulerOutput
from shardserve.utils.network import get_free_port, get_loopback_ip, tcp_init_method
from shardserve.worker.bootstrap import RankSpec

logger = logging.getLogger(__name__)

POLL_S = 0.05          # how often a waiting engine checks that every rank is alive
STARTUP_TIMEOUT_S = 300.0
READY_ID = 0           # the reply id of a rank's start-up report


class MultiprocExecutor(Executor):
    startup_timeout_s = STARTUP_TIMEOUT_S

    def __init__(self, cfg: EngineConfig, eos_token_ids: list[int], progress: bool = False) -> None:
        super().__init__(cfg, eos_token_ids, progress)
        par = cfg.parallel
        self.world_size = par.world_size
        self.layer_counts = resolve_partition(cfg)
        self.layer_ranges = layer_ranges(self.layer_counts)
        self.requests = MessageQueue.create(n_readers=self.world_size)
        self.results = MessageQueue.create(n_readers=1, reader_index=0)
        self.replies = [MessageQueue.create(n_readers=1, reader_index=0, n_chunks=4) for _ in range(self.world_size)]
        self._pending: deque[int] = deque()
        self._dead: str | None = None
        self._rpc_id = READY_ID
        init_method = tcp_init_method(get_loopback_ip(), get_free_port())
        # the ranks share this process's thread budget (the whole host, or what a DP router gave this replica)
        import torch
        threads = max(1, torch.get_num_threads() // self.world_size)
        self._err_dir = tempfile.mkdtemp(prefix="shardserve-ranks-")
        self.procs: list[subprocess.Popen] = []
        for rank in range(self.world_size):
            rank_spec = RankSpec(rank=rank, world_size=self.world_size, config=cfg, layer_ranges=self.layer_ranges,
                                 eos_token_ids=eos_token_ids, init_method=init_method, threads=threads)
            launch = {"rank_spec": rank_spec.to_dict(), "requests": self.requests.handle(),
                      "replies": self.replies[rank].handle(),
                      "results": self.results.handle() if rank == self.driver_rank else None,
                      "error_file": os.path.join(self._err_dir, f"rank{rank}.err")}
            env = dict(os.environ, SHARDSERVE_WORKER_SPEC=json.dumps(launch), SHARDSERVE_RANK=str(rank),
                       OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
            self.procs.append(subprocess.Popen([sys.executable, "-m", "shardserve.worker.main"], env=env))
        try:
            self._gather(READY_ID, list(range(self.world_size)), "start-up", STARTUP_TIMEOUT_S)
            info = self.collective_rpc("load_info", timeout=STARTUP_TIMEOUT_S)
            self.bytes_read_per_rank: list[int] = [i["bytes_read"] for i in info]
            self.load_ms_per_rank: list[int] = [i["load_ms"] for i in info]
            self.initialize_cache()
        except BaseException:
            self.shutdown()
            raise

    # --- steps -------------------------------------------------------------------------------------------
    @property
    def max_in_flight(self) -> int:
        par = self.cfg.parallel
        return par.max_micro_batches or par.pipeline_parallel_size

    def submit(self, sched: SchedulerOutput) -> None:
        self._check_alive()
        self.requests.enqueue({"type": "step", "sched": sched})
        self._pending.append(sched.step_id)

    def collect(self) -> ModelRunnerOutput:
        self._pending.popleft()
        msg = self._receive()
        self.last_result = msg["result"]
        return self.last_result

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.submit(sched)
        return self.collect()

    def _receive(self) -> dict:
        while True:
            try:
                msg = self.results.dequeue(timeout=POLL_S)
            except TimeoutError:
                self._check_alive()
                continue
            if "error" in msg:
                self._dead = "a worker raised:\n" + msg["error"]
                raise ExecutorError(self._dead)
            return msg

    # --- collective_rpc ----------------------------------------------------------------------------------
    def collective_rpc(self, method: str, *args: Any, ranks: list[int] | None = None,
                       timeout: float | None = None) -> list[Any]:
        self._check_alive()
        targets = self.rpc_targets(method, ranks)
        if not targets:
            return []
        self._rpc_id += 1
        try:
            self.requests.enqueue({"type": "rpc", "id": self._rpc_id, "method": method, "args": list(args),
                                   "ranks": targets}, timeout=timeout)
        except TimeoutError:
            self._dead = f"the ranks did not take collective_rpc({method!r}) within {timeout:g} s (a rank is stuck)"
            raise ExecutorError(self._dead) from None
        return self._gather(self._rpc_id, targets, f"collective_rpc({method!r})", timeout)

    def _gather(self, call_id: int, targets: list[int], what: str, timeout: float | None) -> list[Any]:
        """Every target rank's reply to `call_id`, in rank order; replies to earlier (timed-out) calls are dropped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        results: dict[int, Any] = {}
        errors: list[str] = []
        for rank in targets:
            while rank not in results:
                try:
                    msg = self.replies[rank].dequeue(timeout=POLL_S)
                except TimeoutError:
                    self._check_alive()
                    if deadline is not None and time.monotonic() > deadline:
                        silent = [r for r in targets if r not in results and not self._answered(r, call_id, results,
                                                                                              errors)]
                        if silent:
                            self._dead = (f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} "
                                          f"did not answer {what} within {timeout:g} s")
                            raise ExecutorError(self._dead) from None
                    continue
                self._take(rank, msg, call_id, results, errors)
        if errors:
            raise ExecutorError(f"{what} failed: " + "; ".join(errors))
        return [results[r] for r in targets]

    @staticmethod
    def _take(rank: int, msg: dict, call_id: int, results: dict[int, Any], errors: list[str]) -> None:
        if msg.get("id") != call_id:
            return  # the late answer to a call that already timed out
        if "error" in msg:
            errors.append(f"rank {rank} failed with {msg['error']}")
        results[rank] = msg.get("result")

    def _answered(self, rank: int, call_id: int, results: dict[int, Any], errors: list[str]) -> bool:
        """Read what `rank` has already sent without waiting (used once a deadline has passed)."""
        while rank not in results:
            try:
                msg = self.replies[rank].dequeue(timeout=0)
            except TimeoutError:
                return False
            self._take(rank, msg, call_id, results, errors)
        return True

    # --- failures ----------------------------------------------------------------------------------------
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
        if self._dead is None:
            try:
                self.write_trace()
            except Exception as e:  # the trace is a diagnostic: never block a shutdown on it
                logger.warning("could not write the trace: %s", e)
        try:
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
        self.requests.stop()
        for q in (self.requests, self.results, *self.replies):
            q.close()
        shutil.rmtree(self._err_dir, ignore_errors=True)

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass
