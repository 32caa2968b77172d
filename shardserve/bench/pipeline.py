"""`shardserve bench pipeline`: a fixed workload through pp stages with 1 and with pp micro-batches in flight;
throughput, each stage's measured utilisation (busy time / wall time) and bubble, against the ideal bubble
(p − 1) / (m + p − 1) of a pipeline with m micro-batches."""
from __future__ import annotations

import argparse
import json
import time

from shardserve.bench.workload import parse_range, random_workload


def add_args(p: argparse.ArgumentParser) -> None:
    from shardserve.engine.args import EngineArgs
    p.add_argument("--num-prompts", type=int, default=32, help="requests in the workload")
    p.add_argument("--input-len", default="64", help="prompt length (or LO:HI)")
    p.add_argument("--output-len", default="64", help="output length (or LO:HI), ignore_eos")
    p.add_argument("--micro-batches", default=None,
                   help="comma-separated micro-batch counts to compare (default: 1,PP)")
    p.add_argument("--output-json", default=None, help="write the results to this JSON file")
    EngineArgs.add_cli_args(p)
    p.set_defaults(pipeline_parallel_size=2)


def _busy(stats: dict, stage: int) -> float:
    return stats.get(f"executor_stage{stage}_compute_s", 0.0) + stats.get(f"executor_stage{stage}_sample_s", 0.0)


def run_one(eargs, wl, micro_batches: int) -> dict:
    from shardserve.entrypoints.llm import LLM
    from shardserve.sampling_params import SamplingParams
    pp = eargs.pipeline_parallel_size
    kw = {**vars(eargs), "max_micro_batches": micro_batches}
    llm = LLM(**kw)
    try:
        params = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0) for o in wl.output_lens]
        llm.generate(prompt_token_ids=wl.prompts[:pp], sampling_params=params[:pp], use_tqdm=False)  # warm-up
        before = llm.engine.get_stats()
        t0 = time.perf_counter()
        llm.generate(prompt_token_ids=wl.prompts, sampling_params=params, use_tqdm=True)
        wall = time.perf_counter() - t0
        after = llm.engine.get_stats()
    finally:
        llm.shutdown()
    util = [(_busy(after, s) - _busy(before, s)) / wall for s in range(pp)]
    ideal_bubble = (pp - 1) / (micro_batches + pp - 1)
    return {"micro_batches": micro_batches, "pp": pp, "wall_s": wall,
            "output_tok_s": wl.num_output_tokens / wall,
            "stage_utilisation": util, "measured_bubble": 1 - sum(util) / pp,
            "ideal_bubble": ideal_bubble, "ideal_utilisation": 1 - ideal_bubble,
            "max_in_flight_seen": llm.engine.stats["max_in_flight_seen"]}


def run(args: argparse.Namespace) -> int:
    from shardserve.engine.args import EngineArgs
    eargs = EngineArgs.from_cli(args)
    pp = eargs.pipeline_parallel_size
    counts = [int(x) for x in args.micro_batches.split(",")] if args.micro_batches else [1, pp]
    wl = random_workload(args.num_prompts, parse_range(args.input_len), parse_range(args.output_len),
                         vocab_size=4096, seed=0, avoid=set(range(8)))
    results = []
    for m in counts:
        r = run_one(eargs, wl, m)
        results.append(r)
        utils = ", ".join(f"{u:.2f}" for u in r["stage_utilisation"])
        print(f"pp={pp} micro-batches={m}: {r['output_tok_s']:.1f} output tok/s; stage utilisation [{utils}]; "
              f"bubble measured {r['measured_bubble']:.2f} vs ideal (p-1)/(m+p-1) = {r['ideal_bubble']:.2f}")
    if len(results) > 1:
        print(f"speed-up of {counts[-1]} vs {counts[0]} micro-batches: "
              f"{results[-1]['output_tok_s'] / results[0]['output_tok_s']:.2f}x")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"results": results}, f, indent=2)
    return 0
