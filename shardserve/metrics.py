"""Prometheus metrics of one server (its own CollectorRegistry, vLLM-style `shardserve:` names, a `replica` label)
and the periodic one-line stats log."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

logger = logging.getLogger("shardserve.stats")

__all__ = ["ServerMetrics", "StatsLogger", "CONTENT_TYPE_LATEST"]

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0)


@dataclass
class _Tally:
    """Plain running totals of one replica (for the stats log's rates)."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    preemptions_seen: float = 0.0   # the core's cumulative count at its last report (resets when it restarts)


class ServerMetrics:
    """Everything /metrics shows. The async engine calls the on_* hooks; nothing here blocks or does I/O."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name", "replica"]
        reg = self.registry
        self.running = Gauge("shardserve:num_requests_running", "Requests in the engine's running batch.",
                             labels, registry=reg)
        self.waiting = Gauge("shardserve:num_requests_waiting", "Requests queued in the engine, not yet scheduled.",
                             labels, registry=reg)
        self.kv_usage = Gauge("shardserve:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                              labels, registry=reg)
        self.kv_free = Gauge("shardserve:kv_cache_free_blocks", "KV-cache blocks free or evictable.",
                             labels, registry=reg)
        self.expert_tokens = Gauge("shardserve:moe_expert_tokens", "MoE: tokens routed to each expert since start "
                                   "(per layer; the load imbalance).", labels + ["layer", "expert"], registry=reg)
        self.healthy = Gauge("shardserve:replica_healthy", "1 while the replica serves, 0 while down or starting.",
                             labels, registry=reg)
        self.prompt_tokens = Counter("shardserve:prompt_tokens", "Prompt tokens of accepted requests.",
                                     labels, registry=reg)
        self.generation_tokens = Counter("shardserve:generation_tokens", "Tokens generated.", labels, registry=reg)
        self.preemptions = Counter("shardserve:num_preemptions", "Sequences preempted (recompute).",
                                   labels, registry=reg)
        self.success = Counter("shardserve:request_success", "Requests finished, by finish reason.",
                               labels + ["finished_reason"], registry=reg)
        self.failures = Counter("shardserve:request_failure", "Requests failed by the server (replica died).",
                                labels, registry=reg)
        self.restarts = Counter("shardserve:replica_restarts", "Replicas restarted after dying.", labels,
                                registry=reg)
        self.migrations = Counter("shardserve:request_migrations", "Requests moved off this replica to another "
                                  "when it died (they go on there; the client sees no error).", labels, registry=reg)
        self.ttft = Histogram("shardserve:time_to_first_token_seconds", "Arrival to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=reg)
        self.itl = Histogram("shardserve:inter_token_latency_seconds", "Time between consecutive token outputs.",
                             labels, buckets=ITL_BUCKETS, registry=reg)
        self.e2e = Histogram("shardserve:e2e_request_latency_seconds", "Arrival to finish.", labels,
                             buckets=E2E_BUCKETS, registry=reg)
        self.tallies: dict[int, _Tally] = {}

    def _l(self, replica: int) -> dict[str, str]:
        return {"model_name": self.model_name, "replica": str(replica)}

    def _tally(self, replica: int) -> _Tally:
        return self.tallies.setdefault(replica, _Tally())

    # --- hooks ---------------------------------------------------------------------------------------------
    def on_replica_up(self, replica: int) -> None:
        self.healthy.labels(**self._l(replica)).set(1)
        self._tally(replica).preemptions_seen = 0.0  # a fresh core counts from zero

    def on_replica_down(self, replica: int) -> None:
        l = self._l(replica)
        self.healthy.labels(**l).set(0)
        for g in (self.running, self.waiting, self.kv_usage):
            g.labels(**l).set(0)
        t = self._tally(replica)
        t.running = t.waiting = t.kv_usage = 0.0

    def on_replica_restart(self, replica: int) -> None:
        self.restarts.labels(**self._l(replica)).inc()

    def on_request_migrated(self, replica: int) -> None:
        self.migrations.labels(**self._l(replica)).inc()

    def on_core_stats(self, replica: int, stats: dict[str, float]) -> None:
        l, t = self._l(replica), self._tally(replica)
        t.running = float(stats.get("num_requests_running", 0))
        t.waiting = float(stats.get("num_requests_waiting", 0))
        t.kv_usage = float(stats.get("kv_cache_usage_perc", 0.0))
        self.running.labels(**l).set(t.running)
        self.waiting.labels(**l).set(t.waiting)
        self.kv_usage.labels(**l).set(t.kv_usage)
        if "num_free_blocks" in stats:
            self.kv_free.labels(**l).set(stats["num_free_blocks"])
        for layer, counts in stats.get("expert_counts", []):
            for expert, n in enumerate(counts):
                self.expert_tokens.labels(**l, layer=str(layer), expert=str(expert)).set(n)
        pre = float(stats.get("num_preemptions", 0))
        if pre > t.preemptions_seen:
            self.preemptions.labels(**l).inc(pre - t.preemptions_seen)
        t.preemptions_seen = pre

    def on_request_accepted(self, replica: int, prompt_tokens: int) -> None:
        self.prompt_tokens.labels(**self._l(replica)).inc(prompt_tokens)
        self._tally(replica).prompt_tokens += prompt_tokens

    def on_generation_tokens(self, replica: int, n: int) -> None:
        self.generation_tokens.labels(**self._l(replica)).inc(n)
        self._tally(replica).generation_tokens += n

    def on_first_token(self, replica: int, seconds: float) -> None:
        self.ttft.labels(**self._l(replica)).observe(seconds)

    def on_inter_token(self, replica: int, seconds: float) -> None:
        self.itl.labels(**self._l(replica)).observe(seconds)

    def on_request_finished(self, replica: int, reason: str, e2e_seconds: float) -> None:
        l = self._l(replica)
        if reason == "error":
            self.failures.labels(**l).inc()
            return
        self.success.labels(**l, finished_reason=reason).inc()
        self.e2e.labels(**l).observe(e2e_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StatsLogger:
    """One line per replica every `interval` seconds: throughput since the last line, queue and KV usage."""

    def __init__(self, metrics: ServerMetrics, interval: float) -> None:
        self.metrics = metrics
        self.interval = interval
        self._last: dict[int, tuple[float, int, int]] = {}

    def lines(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        out = []
        for replica in sorted(self.metrics.tallies):
            t = self.metrics.tallies[replica]
            t0, p0, g0 = self._last.get(replica, (now - self.interval, 0, 0))
            dt = max(1e-9, now - t0)
            self._last[replica] = (now, t.prompt_tokens, t.generation_tokens)
            out.append(f"replica {replica}: prompt throughput {(t.prompt_tokens - p0) / dt:.1f} tok/s, "
                       f"generation throughput {(t.generation_tokens - g0) / dt:.1f} tok/s, "
                       f"running {t.running:.0f} reqs, waiting {t.waiting:.0f} reqs, "
                       f"KV cache usage {100 * t.kv_usage:.1f}%")
        return out

    def log(self) -> None:
        for line in self.lines():
            logger.info(line)
