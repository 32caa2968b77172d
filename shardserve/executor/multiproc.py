"""One process per rank on this host: steps and collective_rpc calls are broadcast over a shared-memory ring
(msgpack), the driver rank (last stage, first TP rank) returns sampled tokens on a second ring, every rank answers
RPCs on a ring of its own, and a dead or silent rank fails the call within seconds instead of hanging.

Liveness. Every rank beats from a thread in a shared-memory heartbeat board (distributed/heartbeat.py) whatever its
main thread does; every wait here (results, RPC replies, and a write blocked on a full ring) checks every 50 ms that
each rank process runs and has beaten within `--rank-stall-timeout-s` (default 10). A rank that died or stalled
fails the wait with a short ExecutorError that names it ("rank 1 died (exit code -9)", "rank 1 stalled: ..."), and
every rank is then killed. A long step is never mistaken for a stall. Nothing is written to disk: a failing rank sends
its error as one line on its reply ring, and its traceback goes to its stderr."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import deque
from typing import Any

from shardserve.config import EngineConfig
from shardserve.distributed.heartbeat import HeartbeatBoard
from shardserve.distributed.message_queue import MessageQueue, reap_orphaned_segments
from shardserve.distributed.pipeline import layer_ranges, resolve_partition
from shardserve.executor.base import Executor, ExecutorError
from shardserve.step import ModelRunnerOutput, SchedulerOutput
from shardserve.utils.network import get_free_port, get_loopback_ip, tcp_init_method
from shardserve.worker.bootstrap import RankSpec

logger = logging.getLogger(__name__)

POLL_S = 0.05          # how often a waiting engine checks that every rank is alive
STARTUP_TIMEOUT_S = 300.0
READY_ID = 0           # the reply id of a rank's start-up report
FATAL_ID = -1          # the reply id of a rank's last words (worker/main.py)


class MultiprocExecutor(Executor):
    startup_timeout_s = STARTUP_TIMEOUT_S

    def __init__(self, cfg: EngineConfig, eos_token_ids: list[int], progress: bool = False) -> None:
        super().__init__(cfg, eos_token_ids, progress)
        par = cfg.parallel
        self.world_size = par.world_size
        self.layer_counts = resolve_partition(cfg)
        self.layer_ranges = layer_ranges(self.layer_counts)
        self.stall_timeout_s = float(par.rank_stall_timeout_s)
        self.procs: list[subprocess.Popen] = []
        self._dead: str | None = None
        reap_orphaned_segments()  # what engines killed together with their resource trackers left behind
        try:
            self.heartbeats = HeartbeatBoard.create(self.world_size)
            self.requests = MessageQueue.create(n_readers=self.world_size)
            self.results = MessageQueue.create(n_readers=1, reader_index=0)
            self.replies = [MessageQueue.create(n_readers=1, reader_index=0, n_chunks=4)
                            for _ in range(self.world_size)]
        except BaseException:
            self.shutdown()
            raise
        self._pending: deque[int] = deque()
        self._fatal: dict[int, str] = {}  # rank → the error it reported dying of
        self._rpc_id = READY_ID
        init_method = tcp_init_method(get_loopback_ip(), get_free_port())
        # the ranks share this process's thread budget (the whole host, or what a DP router gave this replica)
        import torch
        threads = max(1, torch.get_num_threads() // self.world_size)
        try:
            for rank in range(self.world_size):
                rank_spec = RankSpec(rank=rank, world_size=self.world_size, config=cfg,
                                     layer_ranges=self.layer_ranges, eos_token_ids=eos_token_ids,
                                     init_method=init_method, threads=threads)
                launch = {"rank_spec": rank_spec.to_dict(), "requests": self.requests.handle(),
                          "replies": self.replies[rank].handle(),
                          "results": self.results.handle() if rank == self.driver_rank else None,
                          "heartbeat": self.heartbeats.name}
                env = dict(os.environ, SHARDSERVE_WORKER_SPEC=json.dumps(launch), SHARDSERVE_RANK=str(rank),
                           OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
                self.procs.append(subprocess.Popen([sys.executable, "-m", "shardserve.worker.main"], env=env))
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
        self._enqueue({"type": "step", "sched": sched}, "a step")
        self._pending.append(sched.step_id)

    def collect(self) -> ModelRunnerOutput:
        self._pending.popleft()
        msg = self._receive()
        self.last_result = msg["result"]
        return self.last_result

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.submit(sched)
        return self.collect()

    def _enqueue(self, msg: dict, what: str, timeout: float | None = None) -> None:
        """Broadcast to the ranks; a write blocked on a full ring gives up when a rank dies or stalls."""
        try:
            self.requests.enqueue(msg, timeout=timeout, check=self._check_alive)
        except TimeoutError:
            raise self._fail(f"the ranks did not take {what} within {timeout:g} s (a rank is stuck)") from None

    def _receive(self) -> dict:
        while True:
            try:
                msg = self.results.dequeue(timeout=POLL_S)
            except TimeoutError:
                self._check_alive()
                continue
            if "error" in msg:
                rank = msg.get("rank", self.driver_rank)
                logger.error("rank %d failed in a step: %s", rank, msg["error"])
                time.sleep(0.2)  # a peer killed mid-step makes this rank's collective fail: name the root cause
                exited = self._exited()
                killed = [(r, c) for r, c in exited if c < 0]
                raise self._fail(self._death_reason(killed) if killed else
                                 f"rank {rank} failed in a step: {msg['error']}")
            return msg

    # --- collective_rpc ----------------------------------------------------------------------------------
    def collective_rpc(self, method: str, *args: Any, ranks: list[int] | None = None,
                       timeout: float | None = None) -> list[Any]:
        self._check_alive()
        targets = self.rpc_targets(method, ranks)
        if not targets:
            return []
        self._rpc_id += 1
        self._enqueue({"type": "rpc", "id": self._rpc_id, "method": method, "args": list(args), "ranks": targets},
                      f"collective_rpc({method!r})", timeout)
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
                            raise self._fail(f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} "
                                             f"did not answer {what} within {timeout:g} s") from None
                    continue
                self._take(rank, msg, call_id, results, errors)
        if errors:
            raise ExecutorError(f"{what} failed: " + "; ".join(errors))
        return [results[r] for r in targets]

    def _take(self, rank: int, msg: dict, call_id: int, results: dict[int, Any], errors: list[str]) -> None:
        if msg.get("id") == FATAL_ID:
            self._fatal[rank] = str(msg.get("error"))
            return
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
        """Raise ExecutorError if a rank has exited or has not beaten for `stall_timeout_s` (then kill them all)."""
        if self._dead:
            raise ExecutorError(self._dead)
        exited = self._exited()
        if exited:
            time.sleep(0.2)  # let the others that go down with it go, so the root cause can be told
            raise self._fail(self._death_reason(self._exited()))
        stalled = self.heartbeats.stalled(self.stall_timeout_s)
        if stalled is not None:
            rank, age = stalled
            raise self._fail(f"rank {rank} stalled: no heartbeat for {age:.1f} s (stopped or frozen; "
                             f"--rank-stall-timeout-s {self.stall_timeout_s:g}); the engine stopped its ranks")

    def _exited(self) -> list[tuple[int, int]]:
        return [(rank, p.returncode) for rank, p in enumerate(self.procs) if p.poll() is not None]

    def _death_reason(self, exited: list[tuple[int, int]]) -> str:
        """One short line naming the root cause: a rank killed by a signal first (the others then fail in their
        collectives), else the first rank that said what it died of, else the first that exited."""
        for rank, _ in exited:
            self._drain_fatal(rank)
        for rank, code in exited:
            logger.error("rank %d (pid %d) exited with code %s%s", rank, self.procs[rank].pid, code,
                         f": {self._fatal[rank]}" if rank in self._fatal else "")
        killed = [(r, c) for r, c in exited if c < 0]
        told = [(r, c) for r, c in exited if r in self._fatal]
        rank, code = (killed or told or exited)[0]
        if rank in self._fatal:
            return f"rank {rank} failed with {self._fatal[rank]}; it exited with code {code}"
        return f"rank {rank} died (exit code {code})"

    def _drain_fatal(self, rank: int) -> None:
        """Read what a dead rank left on its reply ring, keeping its last words."""
        for _ in range(64):
            try:
                msg = self.replies[rank].dequeue(timeout=0)
            except Exception:  # empty (TimeoutError), or a torn message from a rank killed mid-write
                return
            if isinstance(msg, dict) and msg.get("id") == FATAL_ID:
                self._fatal[rank] = str(msg.get("error"))

    def _fail(self, reason: str) -> ExecutorError:
        """The executor cannot go on: remember why (every later call raises the same), kill every rank (a stopped
        one too: SIGKILL needs no cooperation) and return the error to raise."""
        if self._dead is None:
            self._dead = reason
            logger.error("executor failed: %s", reason)
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
        return ExecutorError(self._dead)

    def shutdown(self) -> None:
        if getattr(self, "_shut", False):
            return
        self._shut = True
        try:
            if self.procs and self._dead is None:
                try:
                    self.write_trace()
                except Exception as e:  # the trace is a diagnostic: never block a shutdown on it
                    logger.warning("could not write the trace: %s", e)
            if self.procs and self._dead is None:
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
        finally:
            self.procs = []
            rings = [getattr(self, "requests", None), getattr(self, "results", None), *getattr(self, "replies", [])]
            for q in rings:
                if q is not None:
                    q.close()  # the owner's close stops the ring first, then unlinks it
            if getattr(self, "heartbeats", None) is not None:
                self.heartbeats.close()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass
