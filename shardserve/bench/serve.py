"""`shardserve bench serve`: load a running OpenAI-compatible server with a seeded random workload (Poisson arrivals
at --request-rate, at most --max-concurrency in flight) over streaming /v1/completions; report request and token
throughput and TTFT, TPOT, ITL and end-to-end latency (mean, p50, p90, p99); optionally plot TTFT and ITL."""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from shardserve.bench.workload import Workload, parse_range, random_workload

PERCENTILES = (50, 90, 99)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the server")
    p.add_argument("--model", default=None, help="model name to request (default: the server's first model)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory for the random prompts (default: the server's model directory, "
                        "as /v1/models reports it)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--num-prompts", type=int, default=64, help="requests to send")
    p.add_argument("--input-len", default="32:256", help="prompt length range LO:HI in tokens (uniform)")
    p.add_argument("--output-len", default="16:128", help="output length range LO:HI (uniform, ignore_eos)")
    p.add_argument("--workload-seed", type=int, default=0, help="seed of the lengths, tokens and arrival times")
    p.add_argument("--request-rate", default="inf",
                   help="requests per second, Poisson arrivals; 'inf' sends them all at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before one request is given up")
    p.add_argument("--output-json", default=None, help="write the results (and per-request data) to this file")
    p.add_argument("--plot", default=None,
                   help="write TTFT and ITL histograms to this PNG (needs matplotlib: pip install 'shardserve[plot]')")


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int = 0
    ttft: float | None = None
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_len < 2:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


async def send_one(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict[str, Any],
                   timeout: float) -> RequestResult:
    """One streaming completion; usage in every chunk (continuous_usage_stats) gives exact token counts."""
    res = RequestResult(prompt_len=len(body["prompt"]))
    t0 = time.perf_counter()
    last = t0
    try:
        async with client.stream("POST", url, json=body, headers=headers, timeout=timeout) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:300].decode(errors='replace')}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                d = json.loads(data)
                if "error" in d:
                    res.error = str(d["error"].get("message"))
                    break
                now = time.perf_counter()
                usage = d.get("usage")
                n = usage["completion_tokens"] if usage else res.output_len + int(bool(d.get("choices")))
                new = n - res.output_len
                if new <= 0:
                    continue
                if res.ttft is None:
                    res.ttft = now - t0
                    res.itls.extend([0.0] * (new - 1))  # tokens that came together with the first one
                else:
                    res.itls.extend([(now - last) / new] * new)
                last, res.output_len = now, n
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    res.latency = time.perf_counter() - t0
    return res


async def run_load(args: argparse.Namespace, wl: Workload, model: str) -> tuple[list[RequestResult], float]:
    url = args.url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rate = float(args.request_rate)
    rng = random.Random(args.workload_seed + 1)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    limits = httpx.Limits(max_connections=args.max_concurrency or max(1, len(wl.prompts)))

    def body(i: int) -> dict[str, Any]:
        return {"model": model, "prompt": wl.prompts[i], "max_tokens": wl.output_lens[i], "temperature": 0.0,
                "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}

    async with httpx.AsyncClient(limits=limits, timeout=args.timeout) as client:
        warm = await send_one(client, url, headers, {**body(0), "max_tokens": 2}, args.timeout)
        if warm.error:
            raise RuntimeError(f"warm-up request failed: {warm.error}")

        async def limited(i: int) -> RequestResult:
            if sem is None:
                return await send_one(client, url, headers, body(i), args.timeout)
            async with sem:
                return await send_one(client, url, headers, body(i), args.timeout)

        t0 = time.perf_counter()
        tasks = []
        for i in range(len(wl.prompts)):
            tasks.append(asyncio.create_task(limited(i)))
            if rate != float("inf") and i + 1 < len(wl.prompts):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def _dist(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean / p50 / p90 / p99 of `values` (seconds → ms by default)."""
    if not values:
        return {"mean": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    xs = sorted(v * scale for v in values)
    out = {"mean": statistics.fmean(xs)}
    for p in PERCENTILES:
        k = min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))
        out[f"p{p}"] = xs[k]
    return out


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    return {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
            "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
            "total_token_throughput": (out_tokens + in_tokens) / duration,
            "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
            "ttft_ms": _dist([r.ttft for r in ok if r.ttft is not None]),
            "tpot_ms": _dist([r.tpot for r in ok if r.tpot is not None]),
            "itl_ms": _dist([x for r in ok for x in r.itls]),
            "e2el_ms": _dist([r.latency for r in ok]),
            "errors": sorted({r.error for r in results if r.error})[:5]}


def print_report(s: dict[str, Any]) -> None:
    print("{s:=^60}".format(s=" Serving Benchmark Result "))
    rows = [("Successful requests:", s["completed"]), ("Failed requests:", s["failed"]),
            ("Benchmark duration (s):", f"{s['duration_s']:.2f}"),
            ("Total input tokens:", s["total_input_tokens"]), ("Total generated tokens:", s["total_output_tokens"]),
            ("Request throughput (req/s):", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")]
    for label, v in rows:
        print(f"{label:<44}{v:>16}")
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        print("{s:-^60}".format(s=title))
        d = s[key]
        name = key.split("_")[0].upper()
        print(f"{'Mean ' + name + ' (ms):':<44}{d['mean']:>16.2f}")
        for p in PERCENTILES:
            print(f"{f'P{p} {name} (ms):':<44}{d[f'p{p}']:>16.2f}")
    for e in s["errors"]:
        print(f"error: {e}")
    print("=" * 60)


def plot(results: list[RequestResult], path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'shardserve[plot]'") from e
    ok = [r for r in results if r.error is None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, values, name in ((axes[0], [r.ttft * 1e3 for r in ok if r.ttft is not None], "TTFT"),
                             (axes[1], [x * 1e3 for r in ok for x in r.itls], "ITL")):
        ax.hist(values, bins=40, color="#4477aa")
        for p, style in zip(PERCENTILES, ("-", "--", ":")):
            v = _dist(values, 1.0)[f"p{p}"]
            ax.axvline(v, color="#cc3311", linestyle=style, label=f"p{p} {v:.1f} ms")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("count")
        ax.set_title(f"{name} distribution ({len(values)} samples)")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    models = httpx.get(f"{base}/v1/models", headers=headers, timeout=30).raise_for_status().json()["data"]
    model = args.model or models[0]["id"]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.tokenizer or models[0].get("root") or model)
    max_len = int(models[0].get("max_model_len") or 1 << 30)
    lo, hi = parse_range(args.input_len)
    olo, ohi = parse_range(args.output_len)
    if hi + ohi > max_len:
        raise ValueError(f"--input-len {args.input_len} plus --output-len {args.output_len} may exceed the server's "
                         f"max_model_len {max_len}; shorten them")
    wl = random_workload(args.num_prompts, (lo, hi), (olo, ohi), len(tok), args.workload_seed,
                         avoid=set(tok.all_special_ids))
    results, duration = asyncio.run(run_load(args, wl, model))
    summary = summarize(results, duration)
    summary.update(url=base, model=model, num_prompts=args.num_prompts, request_rate=args.request_rate,
                   max_concurrency=args.max_concurrency, input_len=args.input_len, output_len=args.output_len,
                   workload_seed=args.workload_seed, client_host=platform.node(), date=time.strftime("%Y-%m-%d"))
    print_report(summary)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({**summary, "requests": [r.__dict__ | {"tpot": r.tpot} for r in results]}, f, indent=2)
    if args.plot:
        plot(results, args.plot, f"{model} @ {base}: rate {args.request_rate}, concurrency "
                                 f"{args.max_concurrency or 'unbounded'}, {args.num_prompts} prompts")
        print(f"plot written to {args.plot}")
    return 0 if summary["failed"] == 0 else 1
