"""The soak's bookkeeping (`shardserve bench soak`, bench/soak.py): what the client saw of each request and its
outcome, the report and the verdict, and the readers of what the server holds (RSS of its process tree from /proc,
KV blocks in use from /metrics)."""
from __future__ import annotations

import math
import os
import signal
import statistics
from pathlib import Path
from dataclasses import dataclass
from typing import Any

OUTCOMES = ("ok", "client_disconnect", "error")
MB = 1024 * 1024


# --- pure parts: one request's record, its outcome, the report and the verdict ----------------------------------
@dataclass
class RequestRecord:
    """What the client saw of one request. `disconnect_after`: the planned client disconnect (streams: after that
    many chunks; non-streaming: after `disconnect_delay_s`); None for a request read to its end."""
    kind: str                           # "completion" | "chat"
    stream: bool
    max_tokens: int
    disconnect_after: int | None = None
    disconnect_delay_s: float | None = None
    status: int | None = None           # HTTP status, None if no response came
    saw_done: bool = False              # streams: the [DONE] line came
    body_ok: bool = False               # non-streaming: a JSON body with choices came
    error_message: str | None = None    # an error chunk in the stream, or the error body of a non-200
    exception: str | None = None        # transport error (connection reset, bad JSON, ...)
    timed_out: bool = False
    disconnected: bool = False          # the client closed the connection early, as planned
    chunks: int = 0                     # streams: data chunks with choices received
    tokens: int = 0                     # completion tokens (from usage; chunks where usage is missing)
    ttft_s: float | None = None
    latency_s: float = 0.0
    start_s: float = 0.0                # since the load began


def classify(r: RequestRecord) -> tuple[str, str | None]:
    """(outcome, reason): "ok"; "client_disconnect" when the client went away as planned (after a 200 and no error
    chunk); "error" for a timeout, a transport error, any non-200 status (5xx or otherwise: the load sends only valid
    requests), an error chunk, or a stream that ended without [DONE] when the client did not disconnect."""
    if r.timed_out:
        return "error", "timeout"
    if r.status is not None and r.status != 200:
        return "error", f"HTTP {r.status}" + (f": {r.error_message}" if r.error_message else "")
    if r.error_message:
        return "error", f"error in stream: {r.error_message}"
    if r.disconnected:
        return "client_disconnect", None
    if r.exception:
        return "error", r.exception
    if r.status is None:
        return "error", "no response"
    if r.stream and not r.saw_done:
        return "error", "stream ended without [DONE]"
    if not r.stream and not r.body_ok:
        return "error", "response without choices"
    return "ok", None


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean / p50 / p99 / max of `values` (seconds → ms by default); zeros when empty."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    xs = sorted(v * scale for v in values)

    def pick(p: float) -> float:
        return xs[min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))]  # nearest rank
    return {"mean": statistics.fmean(xs), "p50": pick(50), "p99": pick(99), "max": xs[-1]}


def rss_slope_mb_per_min(timeline: list[tuple[float, dict[str, float]]], key: str, skip: float = 0.2) -> float | None:
    """Least-squares slope of one process's RSS (MB) over the load, leaving out the first `skip` of it (warm-up);
    None with fewer than 3 samples."""
    pts = [(t, s[key]) for t, s in timeline if key in s]
    if pts:
        t_end = pts[-1][0]
        pts = [(t, v) for t, v in pts if t >= skip * t_end]
    if len(pts) < 3:
        return None
    mt = statistics.fmean(t for t, _ in pts)
    mv = statistics.fmean(v for _, v in pts)
    den = sum((t - mt) ** 2 for t, _ in pts)
    if den == 0:
        return None
    return 60.0 * sum((t - mt) * (v - mv) for t, v in pts) / den


def verdict(counts: dict[str, int], kv_baseline: int | None, kv_end: int | None,
            rss: dict[str, dict[str, float | None]], rss_tolerance_mb: float, replica_restarts: float = 0.0,
            server_exit: dict[str, Any] | None = None) -> dict[str, Any]:
    """pass iff zero errors, KV blocks in use at the end equal to the baseline, each process's end RSS within the
    tolerance of its baseline (and still alive), no replica restart, and (when given) a clean exit on SIGTERM."""
    reasons: list[str] = []
    if counts.get("error", 0):
        reasons.append(f"{counts['error']} request error(s)")
    if counts.get("ok", 0) + counts.get("client_disconnect", 0) == 0:
        reasons.append("no request completed")
    if kv_baseline is None or kv_end is None:
        reasons.append("KV blocks in use could not be read from /metrics")
    elif kv_end != kv_baseline:
        reasons.append(f"KV blocks in use {kv_end} at the end, {kv_baseline} at baseline")
    for name, d in sorted(rss.items()):
        base, end = d.get("baseline"), d.get("end")
        if base is None:
            continue  # appeared during the soak: reported, not judged (a restart fails below)
        if end is None:
            reasons.append(f"process {name} is gone at the end")
        elif end - base > rss_tolerance_mb:
            reasons.append(f"{name} RSS grew {end - base:.0f} MB (baseline {base:.0f} MB, end {end:.0f} MB; "
                           f"tolerance {rss_tolerance_mb:.0f} MB)")
    if replica_restarts:
        reasons.append(f"{replica_restarts:.0f} replica restart(s)")
    if server_exit is not None:
        if server_exit.get("killed"):
            reasons.append(f"server did not exit within {server_exit.get('timeout_s')} s of SIGTERM (killed)")
        elif server_exit.get("returncode") not in (0, -signal.SIGTERM):
            reasons.append(f"server exited with {server_exit.get('returncode')} after SIGTERM")
        if server_exit.get("orphans"):
            reasons.append(f"child processes left after the server exited: {server_exit['orphans']}")
    return {"pass": not reasons, "reasons": reasons}


def build_report(records: list[RequestRecord], duration_s: float, rss_baseline: dict[str, float],
                 rss_peak: dict[str, float], rss_end: dict[str, float], kv_baseline: int | None, kv_end: int | None,
                 rss_tolerance_mb: float, timeline: list[tuple[float, dict[str, float]]] | None = None,
                 replica_restarts: float = 0.0, server_exit: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON report: requests by outcome (and by kind), error reasons, tokens, throughput, latency, RSS per
    process (MB), KV blocks in use, and the verdict."""
    counts = {o: 0 for o in OUTCOMES}
    by_kind: dict[str, dict[str, int]] = {}
    errors: dict[str, int] = {}
    ok: list[RequestRecord] = []
    for r in records:
        outcome, reason = classify(r)
        counts[outcome] += 1
        kind = f"{r.kind}/{'stream' if r.stream else 'full'}"
        by_kind.setdefault(kind, {o: 0 for o in OUTCOMES})[outcome] += 1
        if reason is not None:
            key = reason[:200]
            errors[key] = errors.get(key, 0) + 1
        if outcome == "ok":
            ok.append(r)
    tokens = sum(r.tokens for r in records if classify(r)[0] != "error")
    dur = max(duration_s, 1e-9)
    names = sorted(set(rss_baseline) | set(rss_peak) | set(rss_end))
    rss: dict[str, dict[str, float | None]] = {}
    for n in names:
        b, e = rss_baseline.get(n), rss_end.get(n)
        rss[n] = {"baseline": b, "peak": rss_peak.get(n), "end": e,
                  "delta": (e - b) if b is not None and e is not None else None,
                  "slope_mb_per_min": rss_slope_mb_per_min(timeline or [], n)}
    report = {
        **(extra or {}),
        "duration_s": duration_s,
        "requests": {"total": len(records), **counts,
                     "disconnects_planned": sum(r.disconnect_after is not None or r.disconnect_delay_s is not None
                                                for r in records)},
        "requests_by_kind": dict(sorted(by_kind.items())),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:20]),
        "tokens_generated": tokens,
        "throughput": {"requests_per_s": len(records) / dur, "ok_requests_per_s": len(ok) / dur,
                       "tokens_per_s": tokens / dur},
        "latency_ms": percentiles([r.latency_s for r in ok]),
        "ttft_ms": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "rss_mb": rss,
        "kv_blocks_in_use": {"baseline": kv_baseline, "end": kv_end},
        "replica_restarts": replica_restarts,
        "server_exit": server_exit,
        "rss_timeline_mb": [[round(t, 1), {k: round(v, 1) for k, v in s.items()}] for t, s in (timeline or [])],
    }
    report["verdict"] = verdict(counts, kv_baseline, kv_end, rss, rss_tolerance_mb, replica_restarts, server_exit)
    return report


def format_report(rep: dict[str, Any]) -> str:
    q, th, lat = rep["requests"], rep["throughput"], rep["latency_ms"]
    lines = ["{s:=^72}".format(s=" Soak Result "),
             f"duration {rep['duration_s']:.0f} s; requests {q['total']}: ok {q['ok']}, client disconnects "
             f"{q['client_disconnect']}, errors {q['error']}",
             f"tokens generated {rep['tokens_generated']} ({th['tokens_per_s']:.1f} tok/s); "
             f"{th['requests_per_s']:.2f} req/s ({th['ok_requests_per_s']:.2f} ok)",
             f"latency of ok requests: p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, max {lat['max']:.0f} ms; "
             f"TTFT p50 {rep['ttft_ms']['p50']:.0f} ms, p99 {rep['ttft_ms']['p99']:.0f} ms",
             f"KV blocks in use: baseline {rep['kv_blocks_in_use']['baseline']}, end {rep['kv_blocks_in_use']['end']}",
             "RSS (MB)                                   baseline      peak       end     delta   slope/min"]

    def f(v: float | None, w: int = 10) -> str:
        return f"{v:>{w}.1f}" if v is not None else f"{'-':>{w}}"
    for name, d in rep["rss_mb"].items():
        lines.append(f"  {name:<38}{f(d['baseline'])}{f(d['peak'])}{f(d['end'])}{f(d['delta'])}"
                     f"{f(d['slope_mb_per_min'], 12)}")
    for reason, n in rep["errors"].items():
        lines.append(f"  {n} x {reason}")
    if rep.get("server_exit"):
        se = rep["server_exit"]
        lines.append(f"server exit after SIGTERM: code {se.get('returncode')} in {se.get('seconds', 0):.1f} s"
                     + (" (killed)" if se.get("killed") else "") + (f", orphans {se['orphans']}" if se.get("orphans")
                                                                    else ""))
    v = rep["verdict"]
    lines.append("verdict: " + ("PASS" if v["pass"] else "FAIL: " + "; ".join(v["reasons"])))
    lines.append("=" * 72)
    return "\n".join(lines)


# --- the server's processes and metrics -------------------------------------------------------------------------
def proc_children() -> dict[int, list[int]]:
    """Every running process's children (pid → child pids), from /proc."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # after "pid (comm) state"
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None  # a zombie has no VmRSS


def _label(pid: int, root: int) -> str:
    if pid == root:
        return f"api_server[{pid}]"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        args = [a.decode(errors="replace") for a in argv if a]
    except OSError:
        args = []
    name = args[args.index("-m") + 1].rsplit(".", 1)[-1] if "-m" in args[:-1] else \
        (Path(args[0]).name if args else "?")
    return f"{name}[{pid}]"


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (pids), root first."""
    kids = proc_children()
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(sorted(kids.get(pid, [])))
    return out


def sample_rss(root: int) -> dict[str, float]:
    """label → RSS in MB of the API server process and each descendant (engine cores, tp/pp workers)."""
    out = {}
    for pid in process_tree(root):
        mb = rss_mb(pid)
        if mb is not None:
            out[_label(pid, root)] = mb
    return out


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text → name → [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = {}
        for part in rest.rstrip("}").split(","):
            if "=" in part:
                k, _, v = part.partition("=")
                labels[k.strip()] = v.strip().strip('"')
        try:
            out.setdefault(name.strip(), []).append((labels, float(value)))
        except ValueError:
            continue
    return out


def kv_state(text: str) -> dict[str, Any]:
    """Per replica: free blocks, usage, blocks in use (total × usage, the total being free / (1 − usage)); running
    and waiting requests; and the sums. `in_use` is None while a replica's usage is 1 (total unknown) or missing."""
    m = parse_metrics(text)

    def per_replica(name: str) -> dict[str, float]:
        return {lab.get("replica", "0"): v for lab, v in m.get(name, [])}
    free = per_replica("shardserve:kv_cache_free_blocks")
    usage = per_replica("shardserve:kv_cache_usage_perc")
    running = per_replica("shardserve:num_requests_running")
    waiting = per_replica("shardserve:num_requests_waiting")
    replicas: dict[str, dict[str, Any]] = {}
    total_in_use: int | None = 0
    for rep in sorted(set(free) | set(usage)):
        f, u = free.get(rep), usage.get(rep)
        in_use = round(f * u / (1.0 - u)) if f is not None and u is not None and u < 1.0 else None
        replicas[rep] = {"free": f, "usage": u, "in_use": in_use, "running": running.get(rep, 0.0),
                         "waiting": waiting.get(rep, 0.0)}
        total_in_use = None if in_use is None or total_in_use is None else total_in_use + in_use
    restarts = sum(v for _, v in m.get("shardserve:replica_restarts_total", []))
    return {"replicas": replicas, "in_use": total_in_use if replicas else None,
            "running": sum(running.values()), "waiting": sum(waiting.values()), "restarts": restarts}


# --- the server subprocess ----------------------------------------------------------------------------------------
