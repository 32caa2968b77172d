"""`shardserve bench ...`: the benchmark subcommands (each takes --output-json)."""
from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "throughput": ("shardserve.bench.throughput", "offline tokens/s on a random workload (--compare-hf)"),
    "latency": ("shardserve.bench.latency", "per-token decode latency (TPOT), prefill time, share in collectives"),
    "comm": ("shardserve.bench.comm", "collective latency and bus bandwidth per message size (shm vs gloo)"),
    "pipeline": ("shardserve.bench.pipeline", "pipeline bubble with 1 vs pp micro-batches in flight"),
    "serve": ("shardserve.bench.serve", "load a running server: request/token throughput, TTFT, TPOT, ITL"),
    "moe": ("shardserve.bench.moe", "MoE layer: TP experts vs expert parallelism (time, bytes moved)"),
    "kernels": ("shardserve.bench.kernels", "each Triton kernel of the GPU path vs the torch code it replaces"),
    "soak": ("shardserve.bench.soak", "start a server, steady mixed load with disconnects, check for leaks"),
}


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHES))
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    for name, (module, help_text) in BENCHES.items():
        mod = importlib.import_module(module)
        bp = bsub.add_parser(name, help=help_text, description=(mod.__doc__ or "").strip(),
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_args(bp)
        bp.set_defaults(func=mod.run)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
