"""`shardserve bench soak`: start a real `shardserve serve`, hold a steady load of mixed requests on it for
--duration-s (completions and chat, streaming and not, random prompt and output lengths) with a share of clients that
disconnect mid-stream, then check that nothing was left behind: zero errors, KV-cache blocks in use back to their
baseline, the resident memory (RSS) of the API process and of each of its child processes within --rss-tolerance-mb
of its baseline, no replica restarted, and the server exiting cleanly on SIGTERM. Writes a JSON report (--out);
exit code 0 on pass, 1 on fail. `make soak` runs it for 10 minutes on the built-in model (docs/soak.md)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shardserve.bench.soak_report import (OUTCOMES, RequestRecord, build_report, classify, format_report,
                                         kv_state, process_tree, rss_mb, sample_rss)
from shardserve.bench.soak_requests import make_request
from shardserve.bench.workload import parse_range

PROGRESS_INTERVAL_S = 10.0
RSS_SAMPLE_INTERVAL_S = 1.0

def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server (a `shardserve serve` subprocess on a free loopback port)")
    g.add_argument("--model", default=None, help="model directory or GGUF file (default: the built-in model)")
    g.add_argument("-dp", "--data-parallel-size", type=int, default=None, help="passed to serve")
    g.add_argument("-tp", "--tensor-parallel-size", type=int, default=None, help="passed to serve")
    g.add_argument("-pp", "--pipeline-parallel-size", type=int, default=None, help="passed to serve")
    g.add_argument("--device", default=None, help="passed to serve (auto, cpu, cuda)")
    g.add_argument("--kv-cache-memory", default=None, help="passed to serve, e.g. 256MiB")
    g.add_argument("--max-model-len", type=int, default=None, help="passed to serve")
    g.add_argument("--server-args", default="",
                   help="any other serve flags, as one shell-quoted string, e.g. \"--max-num-seqs 16 --seed 1\"")
    g.add_argument("--server-log", default=None,
                   help="file for the server's output (default: a temporary file, its path printed)")
    g.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for /health 200")
    g.add_argument("--stop-timeout", type=float, default=60.0,
                   help="seconds the server may take to exit after SIGTERM (then it is killed and the soak fails)")
    g = p.add_argument_group("load")
    g.add_argument("--duration-s", type=float, default=600.0, help="seconds of steady load")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight at all times")
    g.add_argument("--disconnect-fraction", type=float, default=0.2,
                   help="share of requests whose client disconnects at a random point (mostly mid-stream)")
    g.add_argument("--prompt-words", default="1:200", help="prompt length range LO:HI in words (uniform)")
    g.add_argument("--max-tokens", default="1:128", help="max_tokens range LO:HI (uniform)")
    g.add_argument("--warmup-requests", type=int, default=8,
                   help="requests sent (concurrency-many at a time) before the baseline is taken, so that one-off "
                        "allocations of the first requests do not count as growth")
    g.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds one request may take, end to end, before it counts as an error (timeout)")
    g.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    g = p.add_argument_group("verdict")
    g.add_argument("--rss-tolerance-mb", type=float, default=100.0,
                   help="most RSS growth, end minus baseline, allowed for each process (see docs/soak.md for why "
                        "growth is not zero without a leak)")
    g.add_argument("--settle-s", type=float, default=60.0,
                   help="after the load, most seconds to wait for the server to go idle with the KV blocks back")
    g.add_argument("--out", default=None, help="write the JSON report to this file")


def server_command(args: argparse.Namespace, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "shardserve.entrypoints.cli", "--log-level", "WARNING", "serve",
           "--host", "127.0.0.1", "--port", str(port)]
    if args.model:
        cmd += ["--model", str(args.model)]
    for flag, value in (("--data-parallel-size", args.data_parallel_size),
                        ("--tensor-parallel-size", args.tensor_parallel_size),
                        ("--pipeline-parallel-size", args.pipeline_parallel_size), ("--device", args.device),
                        ("--kv-cache-memory", args.kv_cache_memory), ("--max-model-len", args.max_model_len)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + shlex.split(args.server_args or "")


class Server:
    """The `shardserve serve` subprocess (its own session, so a Ctrl-C of the soak reaches it only as our SIGTERM)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from shardserve.utils.network import get_free_port
        self.port = get_free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = server_command(args, self.port)
        if args.server_log:
            self.log_path = Path(args.server_log)
        else:
            fd, name = tempfile.mkstemp(prefix="shardserve-soak-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start-up "
                                   f"(log {self.log_path}):\n{self.log_tail()}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=5)
                body = r.json()
                if r.status_code == 200 and all(x["healthy"] for x in body["replicas"]):
                    return body
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready within {timeout:.0f} s (log {self.log_path}):\n{self.log_tail()}")

    def stop(self, timeout: float) -> dict[str, Any]:
        """SIGTERM, wait; kill after `timeout`. Reports the exit code, the time it took and any descendants left."""
        pids = [p for p in process_tree(self.proc.pid) if p != self.proc.pid]
        t0 = time.monotonic()
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                killed = True
                self.proc.kill()
                self.proc.wait(timeout=30)
        seconds = time.monotonic() - t0
        orphans = []
        deadline = time.monotonic() + 10.0  # children see their parent go and exit on their own
        for pid in pids:
            while rss_mb(pid) is not None and time.monotonic() < deadline:
                time.sleep(0.2)
            if rss_mb(pid) is not None:
                orphans.append(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self._log.close()
        return {"returncode": self.proc.returncode, "seconds": seconds, "killed": killed, "timeout_s": timeout,
                "orphans": orphans}


# --- the load ---------------------------------------------------------------------------------------------------
@dataclass
class LoadState:
    records: list[RequestRecord] = field(default_factory=list)
    in_flight: int = 0


async def send(client: httpx.AsyncClient, base: str, model: str, rec: RequestRecord, body: dict,
               timeout: float) -> RequestRecord:
    """Run one request to its end or to its planned disconnect; fill in what was seen."""
    url = f"{base}/v1/{'completions' if rec.kind == 'completion' else 'chat/completions'}"
    body = {**body, "model": model}
    t0 = time.perf_counter()

    async def full() -> None:
        r = await client.post(url, json=body)
        rec.status = r.status_code
        if r.status_code != 200:
            rec.error_message = r.text[:300]
            return
        d = r.json()
        rec.body_ok = bool(d.get("choices"))
        rec.tokens = int((d.get("usage") or {}).get("completion_tokens", 0))

    async def streamed() -> None:
        async with client.stream("POST", url, json=body) as r:
            rec.status = r.status_code
            if r.status_code != 200:
                rec.error_message = (await r.aread())[:300].decode(errors="replace")
                return
            if rec.disconnect_after == 0:
                rec.disconnected = True
                return  # leaving the block closes the connection
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    rec.saw_done = True
                    break
                d = json.loads(data)
                if "error" in d:
                    rec.error_message = str((d["error"] or {}).get("message"))[:300]
                    break
                usage = d.get("usage")
                if d.get("choices"):
                    rec.chunks += 1
                    if rec.ttft_s is None:
                        rec.ttft_s = time.perf_counter() - t0
                    rec.tokens = usage["completion_tokens"] if usage else rec.tokens + 1
                elif usage:
                    rec.tokens = usage["completion_tokens"]
                if rec.disconnect_after is not None and rec.chunks >= rec.disconnect_after:
                    rec.disconnected = True
                    break

    try:
        if rec.stream:
            await asyncio.wait_for(streamed(), timeout)
        elif rec.disconnect_delay_s is not None and rec.disconnect_delay_s < timeout:
            try:
                await asyncio.wait_for(full(), rec.disconnect_delay_s)
            except asyncio.TimeoutError:
                rec.disconnected = True  # the cancelled request closed its connection
        else:
            await asyncio.wait_for(full(), timeout)
    except asyncio.TimeoutError:
        rec.timed_out = True
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        rec.exception = f"{type(e).__name__}: {e}"[:300]
    rec.latency_s = time.perf_counter() - t0
    return rec


async def run_load(args: argparse.Namespace, base: str, model: str, max_model_len: int, duration: float,
                   state: LoadState, rng: random.Random, t_start: float) -> None:
    """`concurrency` workers, each sending one request after another until `duration` has passed."""
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        end = time.monotonic() + duration

        async def worker() -> None:
            while time.monotonic() < end:
                rec, body = make_request(rng, args, max_model_len)
                rec.start_s = time.monotonic() - t_start
                state.in_flight += 1
                try:
                    await send(client, base, model, rec, body, args.request_timeout)
                finally:
                    state.in_flight -= 1
                state.records.append(rec)
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))


async def warm_up(args: argparse.Namespace, base: str, model: str, max_model_len: int, rng: random.Random) -> list:
    """--warmup-requests requests of the same mix but read to their end (no disconnects)."""
    out: list[RequestRecord] = []
    if args.warmup_requests <= 0:
        return out
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout, connect=30.0)) as client:
        sem = asyncio.Semaphore(max(1, args.concurrency))

        async def one() -> None:
            async with sem:
                rec, body = make_request(rng, argparse.Namespace(**{**vars(args), "disconnect_fraction": 0.0}),
                                         max_model_len)
                out.append(await send(client, base, model, rec, body, args.request_timeout))
        await asyncio.gather(*(one() for _ in range(args.warmup_requests)))
    return out


def fetch_kv(base: str) -> dict[str, Any]:
    return kv_state(httpx.get(f"{base}/metrics", timeout=10).text)


def wait_idle(base: str, kv_baseline: int | None, settle_s: float, min_s: float = 3.0) -> dict[str, Any]:
    """Poll /metrics until no request runs or waits and the KV blocks in use are back at `kv_baseline` (for two
    polls in a row, at least `min_s` after the load: an idle core reports every second), or `settle_s` passes."""
    t0 = time.monotonic()
    good = 0
    kv: dict[str, Any] = {}
    while True:
        try:
            kv = fetch_kv(base)
        except httpx.HTTPError:
            kv = {}
        idle = kv and kv["running"] == 0 and kv["waiting"] == 0 and kv["in_use"] == kv_baseline
        good = good + 1 if idle else 0
        elapsed = time.monotonic() - t0
        if (good >= 2 and elapsed >= min_s) or elapsed >= settle_s:
            kv["settle_s"] = elapsed
            return kv
        time.sleep(0.5)


def _progress(t: float, state: LoadState, rss: dict[str, float], kv: dict[str, Any] | None) -> str:
    counts = {o: 0 for o in OUTCOMES}
    tokens = 0
    for r in state.records:
        o = classify(r)[0]
        counts[o] += 1
        tokens += r.tokens if o != "error" else 0
    api = sum(v for k, v in rss.items() if k.startswith("api_server"))
    kids = sum(v for k, v in rss.items() if not k.startswith("api_server"))
    kv_txt = f", KV blocks in use {kv['in_use']}" if kv else ""
    return (f"[{t:6.0f} s] done {len(state.records)} (ok {counts['ok']}, disconnects {counts['client_disconnect']}, "
            f"errors {counts['error']}), in flight {state.in_flight}, {tokens / max(t, 1e-9):.1f} tok/s, "
            f"RSS api {api:.0f} MB, children {kids:.0f} MB{kv_txt}")


async def soak(args: argparse.Namespace, server: Server, base: str, model: str, max_model_len: int,
               rng: random.Random) -> tuple[LoadState, float, dict[str, float], list]:
    """The load plus a sampler: RSS every second (peaks), a progress line and a timeline point every 10 s."""
    state = LoadState()
    t_start = time.monotonic()
    peak: dict[str, float] = {}
    timeline: list[tuple[float, dict[str, float]]] = []
    load = asyncio.create_task(run_load(args, base, model, max_model_len, args.duration_s, state, rng, t_start))
    next_progress = t_start + PROGRESS_INTERVAL_S
    while not load.done():
        await asyncio.wait({load}, timeout=RSS_SAMPLE_INTERVAL_S)
        rss = await asyncio.to_thread(sample_rss, server.proc.pid)
        for k, v in rss.items():
            peak[k] = max(peak.get(k, 0.0), v)
        now = time.monotonic()
        if now >= next_progress:
            next_progress += PROGRESS_INTERVAL_S
            timeline.append((now - t_start, rss))
            try:
                kv = await asyncio.to_thread(fetch_kv, base)
            except httpx.HTTPError:
                kv = None
            print(_progress(now - t_start, state, rss, kv), flush=True)
    await load  # re-raises a crash of the load itself
    return state, time.monotonic() - t_start, peak, timeline


def run(args: argparse.Namespace) -> int:
    if args.duration_s <= 0 or args.concurrency < 1 or not 0.0 <= args.disconnect_fraction <= 1.0:
        raise ValueError("need --duration-s > 0, --concurrency >= 1 and 0 <= --disconnect-fraction <= 1")
    parse_range(args.prompt_words), parse_range(args.max_tokens)  # bad ranges fail before the server starts
    rng = random.Random(args.seed)
    server = Server(args)
    print(f"starting: {shlex.join(server.cmd)}\nserver log: {server.log_path}", flush=True)
    server_exit = None
    try:
        t0 = time.monotonic()
        health = server.wait_ready(args.start_timeout)
        base = server.url
        models = httpx.get(f"{base}/v1/models", timeout=30).raise_for_status().json()["data"]
        model, max_model_len = models[0]["id"], int(models[0].get("max_model_len") or 2048)
        rss_startup = sample_rss(server.proc.pid)
        print(f"ready in {time.monotonic() - t0:.0f} s: model {model}, max_model_len {max_model_len}, "
              f"{len(health['replicas'])} replica(s); warming up with {args.warmup_requests} requests", flush=True)
        warm = asyncio.run(warm_up(args, base, model, max_model_len, rng))
        warm_errors = [classify(r)[1] for r in warm if classify(r)[0] == "error"]
        kv0 = wait_idle(base, 0, args.settle_s)
        kv_baseline = kv0.get("in_use")
        rss_baseline = sample_rss(server.proc.pid)
        print(f"baseline: KV blocks in use {kv_baseline}, RSS (MB) "
              + ", ".join(f"{k} {v:.0f}" for k, v in rss_baseline.items()), flush=True)
        state, duration, peak, timeline = asyncio.run(soak(args, server, base, model, max_model_len, rng))
        for k, v in rss_baseline.items():
            peak[k] = max(peak.get(k, 0.0), v)
        kv_end = wait_idle(base, kv_baseline, args.settle_s)
        rss_end = sample_rss(server.proc.pid)
        for k, v in rss_end.items():
            peak[k] = max(peak.get(k, 0.0), v)
        timeline.append((duration, rss_end))
    except BaseException:
        print(f"soak aborted; server log {server.log_path}:\n{server.log_tail()}", file=sys.stderr)
        server.stop(args.stop_timeout)
        raise
    server_exit = server.stop(args.stop_timeout)
    extra = {"config": {k: v for k, v in vars(args).items() if k != "func"},
             "server_command": server.cmd, "server_log": str(server.log_path), "model": model,
             "max_model_len": max_model_len, "replicas": len(health["replicas"]),
             "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host_cpus": os.cpu_count(),
             "warmup": {"requests": len(warm), "errors": warm_errors},
             "rss_startup_mb": rss_startup, "settle_s": kv_end.get("settle_s"),
             "kv_end_per_replica": kv_end.get("replicas")}
    rep = build_report(state.records, duration, rss_baseline, peak, rss_end, kv_baseline, kv_end.get("in_use"),
                       args.rss_tolerance_mb, timeline, kv_end.get("restarts", 0.0), server_exit, extra)
    if warm_errors:
        rep["verdict"]["pass"] = False
        rep["verdict"]["reasons"].append(f"{len(warm_errors)} warm-up request error(s): {warm_errors[:3]}")
    print(format_report(rep), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=2) + "\n")
        print(f"report written to {args.out}")
    if not rep["verdict"]["pass"]:
        print(f"server log: {server.log_path}")
    return 0 if rep["verdict"]["pass"] else 1


__all__ = ["run", "add_args"]
