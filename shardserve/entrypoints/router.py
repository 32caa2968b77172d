"""The data-parallel router: N engine-core replicas behind one front; each request goes to the least-loaded healthy
replica, a replica that dies is restarted while the others keep serving (its requests migrate to them:
request_migration.py), and a full queue is refused (429)."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

from shardserve.engine.args import EngineArgs
from shardserve.engine.core_client import HEARTBEAT_TIMEOUT_S, EngineCoreClient
from shardserve.engine.core_launch import core_threads
from shardserve.engine.request_stream import EngineUnavailable, Progress, RequestRejected, RequestStream
from shardserve.entrypoints.request_migration import MigratingStream
from shardserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from shardserve.metrics import ServerMetrics

logger = logging.getLogger(__name__)

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)   # waits before successive restart attempts of one replica
MAX_MIGRATIONS = 2   # default: how many times one request may move to another replica when its replica dies

__all__ = ["Router", "QueueFull", "EngineUnavailable", "RequestRejected", "ReplicaLoad", "pick_replica",
           "core_engine_args"]


class QueueFull(RuntimeError):
    """Too many requests are waiting for their first token (--max-waiting-requests): a 429."""


@dataclass
class ReplicaLoad:
    healthy: bool
    outstanding_tokens: int     # prompt tokens not yet prefilled + tokens still to generate
    in_flight: int


def pick_replica(loads: Sequence[ReplicaLoad], exclude: set[int] = frozenset()) -> int | None:  # type: ignore[assignment]
    """The healthy replica with the fewest outstanding tokens; ties go to fewer requests, then the lowest index.

    Outstanding tokens track the work a replica still has to do (a long prompt weighs more than a short one, a
    request near its end less than a fresh one), counted in this process, so they are exact at the moment of choice
    (the cores' own queue gauges arrive every half second)."""
    best, best_key = None, None
    for i, load in enumerate(loads):
        if not load.healthy or i in exclude:
            continue
        key = (load.outstanding_tokens, load.in_flight, i)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def core_engine_args(args: EngineArgs, max_model_len: int, model: str) -> dict[str, Any]:
    """The EngineArgs of one replica as a plain dict (JSON for the core's spec): one replica, model resolved."""
    d = asdict(args)
    d.update(model=model, data_parallel_size=1, max_model_len=max_model_len)
    return d


def _heartbeat_age(client: EngineCoreClient) -> float | None:
    silent = getattr(client, "silent_s", None)  # (the router's tests drive stand-ins without one)
    return round(silent, 1) if client.state == "ready" and silent is not None else None


class Router:
    """The replicas (one EngineCoreClient each) behind the API server: routing, admission, restarts."""

    def __init__(self, args: EngineArgs, model: str, max_model_len: int, metrics: ServerMetrics | None = None,
                 max_waiting_requests: int | None = None, heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
                 threads: int | None = None, max_migrations: int = MAX_MIGRATIONS) -> None:
        self.num_replicas = max(1, args.data_parallel_size)
        self.core_args = core_engine_args(args, max_model_len, model)
        # one CPU stays with the API process (HTTP, JSON, tokenization): OpenMP threads that share their
        # cores with it stall at every parallel region (docs/benchmarks.md, "Serving")
        self.threads = threads or core_threads(self.num_replicas, reserve=1)
        self.metrics = metrics
        self.max_waiting_requests = max_waiting_requests
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_migrations = max_migrations
        self.migrations = 0
        self.replicas: list[EngineCoreClient] = [self._new_client(i) for i in range(self.num_replicas)]
        self.restarts = [0] * self.num_replicas
        self.started = False
        self.stopping = False
        self._restart_tasks: dict[int, asyncio.Task] = {}

    def _new_client(self, i: int) -> EngineCoreClient:
        return EngineCoreClient(self.core_args, replica=i, threads=self.threads, metrics=self.metrics,
                           on_exit=self._on_exit, heartbeat_timeout_s=self.heartbeat_timeout_s)

    # --- life cycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every replica (in parallel); if any fails to start, stop them all and raise its reason."""
        results = await asyncio.gather(*(r.start() for r in self.replicas), return_exceptions=True)
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            await self.shutdown()
            raise errors[0]
        for i in range(self.num_replicas):
            self._replica_up(i)
        self.started = True

    async def shutdown(self) -> None:
        self.stopping = True
        for t in self._restart_tasks.values():
            t.cancel()
        await asyncio.gather(*(r.shutdown() for r in self.replicas), return_exceptions=True)

    def _replica_up(self, i: int) -> None:
        if self.metrics is not None:
            self.metrics.on_replica_up(i)

    def _on_exit(self, client: EngineCoreClient) -> None:
        i = client.replica
        if self.stopping or self.replicas[i] is not client or i in self._restart_tasks:
            return
        self._restart_tasks[i] = asyncio.get_running_loop().create_task(self._restart(i))

    async def _restart(self, i: int) -> None:
        attempt = 0
        try:
            while not self.stopping:
                await asyncio.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
                attempt += 1
                client = self._new_client(i)
                self.replicas[i] = client
                logger.warning("restarting replica %d (attempt %d)", i, attempt)
                try:
                    await client.start()
                except Exception as e:  # noqa: BLE001 - keep trying, with backoff
                    logger.error("replica %d did not restart: %s", i, e)
                    continue
                self.restarts[i] += 1
                if self.metrics is not None:
                    self.metrics.on_replica_restart(i)
                self._replica_up(i)
                return
        finally:
            self._restart_tasks.pop(i, None)

    # --- state ---------------------------------------------------------------------------------------------
    @property
    def num_healthy(self) -> int:
        return sum(r.healthy for r in self.replicas)

    @property
    def num_waiting(self) -> int:
        return sum(r.num_waiting for r in self.replicas)

    def loads(self) -> list[ReplicaLoad]:
        return [ReplicaLoad(r.healthy, r.outstanding_tokens, r.num_in_flight) for r in self.replicas]

    def status(self) -> list[dict[str, Any]]:
        return [{"replica": r.replica, "state": r.state, "healthy": r.healthy, "pid": r.pid,
                 "restarts": self.restarts[r.replica], "in_flight": r.num_in_flight, "waiting": r.num_waiting,
                 "outstanding_tokens": r.outstanding_tokens,
                 # seconds since its last heartbeat (every 0.5 s, steps or not); unhealthy past the heartbeat timeout
                 "heartbeat_age_s": _heartbeat_age(r),
                 **({"error": r.dead_reason} if r.state == "dead" and getattr(r, "dead_reason", None) else {})}
                for r in self.replicas]

    # --- requests ------------------------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          prompt: str | None = None, arrival: float | None = None) -> MigratingStream:
        """Route the request; raises QueueFull, RequestRejected (client error) or EngineUnavailable (none serving).
        The stream follows the request if its replica dies (up to max_migrations moves)."""
        arrival = arrival or time.monotonic()
        if self.max_waiting_requests is not None and self.num_waiting >= self.max_waiting_requests:
            raise QueueFull(f"the server has {self.num_waiting} requests waiting for their first token "
                            f"(--max-waiting-requests {self.max_waiting_requests}); retry later")
        stream = await self._place(request_id, prompt_token_ids, params, prompt, arrival)
        return MigratingStream(self._place, stream, prompt_token_ids, params, prompt, arrival, self.max_migrations,
                               self._migrated)

    def _migrated(self, src: int, dst: int | None, arrival: float) -> None:
        """A request left replica `src` when it died: for `dst`, or failed (None: no migration left or possible)."""
        if dst is not None:
            self.migrations += 1
        if self.metrics is not None:
            if dst is None:
                self.metrics.on_request_finished(src, "error", time.monotonic() - arrival)
            else:
                self.metrics.on_request_migrated(src)

    async def _place(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     prompt: str | None, arrival: float, progress: Progress | None = None,
                     exclude: set[int] = frozenset()) -> RequestStream:  # type: ignore[assignment]
        """Put the request on the least-loaded healthy replica not in `exclude` (no admission check: a migrating
        request was admitted already)."""
        tried: set[int] = set(exclude)
        while True:
            i = pick_replica(self.loads(), tried)
            if i is None:
                state = "loading" if not self.started else "down"
                raise EngineUnavailable(f"no engine replica is serving (the model is {state}); retry later"
                                        if state == "loading" else
                                        f"no engine replica is serving ({self.num_replicas - self.num_healthy} of "
                                        f"{self.num_replicas} down, restarting); retry later")
            try:
                return await self.replicas[i].add_request(request_id, prompt_token_ids, params, prompt, arrival,
                                                          progress)
            except EngineUnavailable:
                tried.add(i)  # it died before accepting the request: nothing ran, so another replica may take it
