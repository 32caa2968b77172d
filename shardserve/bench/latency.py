"""`shardserve bench latency`: prefill latency and per-token decode latency (TPOT) of one batch at fixed prompt and
output lengths, per batch size, and the share of decode time the driver rank spends in collectives.

Each measurement adds `batch` requests of `--input-len` random prompt tokens (fresh tokens every run, so the
prefix cache never helps) with `max_tokens=--output-len, ignore_eos`, then steps the engine until they finish:

    prefill_ms   wall time of the steps that still compute prompt tokens (until every sequence has its first token)
    tpot_ms      mean wall time of a pure decode step (one new token for every sequence)
    weight_gbps  weight bytes read per decode step (every active parameter but the input embedding) / TPOT
    bw_share     weight_gbps / (the device's measured copy bandwidth × tp): how close decode is to the memory
                 limit (target on a GPU at batch 1: >= 80%)
    comm_share   collective time / wall time over the decode steps, from the driver rank's cumulative counters
                 (`collective_stats()` of parallel_state, switched on here with SHARDSERVE_COMM_TIMING=1, which
                 the worker adds to its stage timings: ModelRunnerOutput.timings["stage{i}_comm_s"], also
                 engine.get_stats()["executor_stage{i}_comm_s"]); "n/a" when the worker does not report them.
                 Collectives replayed inside a CUDA graph are not timed: pass --enforce-eager for it on a GPU

Results are the median over --iters runs after one warm-up run per batch size.

--compare-llamacpp FILE.gguf also runs llama.cpp (llama-cpp-python, optional: `pip install llama-cpp-python`) at
batch 1 on the engine's batch-1 prompt token ids (warm-up included), with the same output length and the engine's
torch thread count, and prints its prefill and TPOT and the ratios (bench/llamacpp_peer.py). llama-cpp-python
decodes one sequence at a time, so batch sizes above 1 get no llama.cpp row; --batch-sizes must include 1.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections import deque
from typing import Any

__all__ = ["add_args", "run"]


def add_args(p: argparse.ArgumentParser) -> None:
    from shardserve.engine.args import EngineArgs
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=32, help="generated tokens per request (ignore_eos)")
    p.add_argument("--batch-sizes", default="1,16", help="comma list of batch sizes")
    p.add_argument("--iters", type=int, default=3, help="measured runs per batch size (after one warm-up)")
    p.add_argument("--allreduce", choices=["auto", "gloo", "shm"], default=None,
                   help="CPU collective path for the ranks (sets SHARDSERVE_ALLREDUCE; default: as set, else auto)")
    p.add_argument("--no-comm-timing", action="store_true", help="do not time collectives (SHARDSERVE_COMM_TIMING)")
    p.add_argument("--compare-llamacpp", default=None, metavar="FILE.gguf",
                   help="also run llama.cpp (needs llama-cpp-python) on this GGUF at batch 1 with the same prompt "
                        "token ids, output length and thread count, and print the ratios")
    p.add_argument("--output-json", default=None, help="write the results to this JSON file")
    EngineArgs.add_cli_args(p)


class _StepRecorder:
    """Wraps the executor's submit/collect (instance attributes shadow the methods, for this engine only) to pair
    each finished step's scheduler output with the timings the driver rank returned."""

    def __init__(self, executor: Any) -> None:
        self._submit, self._collect = executor.submit, executor.collect
        self._queued: deque = deque()
        self.last: tuple[Any, dict] | None = None
        executor.submit, executor.collect = self.submit, self.collect

    def submit(self, out: Any) -> None:
        self._submit(out)
        self._queued.append(out)

    def collect(self) -> Any:
        result = self._collect()
        self.last = (self._queued.popleft(), dict(result.timings))
        return result


def _comm(timings: dict) -> tuple[float, float] | None:
    """(comm seconds, calls) of the driver's stage, cumulative: `stage{i}_comm_s` of the last stage i."""
    stages = [int(k[5:-7]) for k in timings if k.startswith("stage") and k.endswith("_comm_s")]
    if not stages:
        return None
    last = max(stages)
    return timings[f"stage{last}_comm_s"], timings.get(f"stage{last}_comm_calls", 0.0)


def _allreduce_label(tp: int, device: str, disabled: bool) -> str:
    """What the tp all-reduces ran on, for the header and the JSON."""
    if tp == 1:
        return "-"
    if device.startswith("cuda"):
        return "nccl (custom all-reduce off)" if disabled else "custom where the GPUs allow (up to 2 MiB), else nccl"
    return "gloo (--disable-custom-all-reduce)" if disabled else os.environ.get("SHARDSERVE_ALLREDUCE", "auto")


def _one_run(engine: Any, rec: _StepRecorder, prompts: list[list[int]], output_len: int, tag: str) -> dict:
    from shardserve.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", None, params, prompt_token_ids=p)
    prefill_s, decode_s, comm_s, comm_calls = 0.0, [], 0.0, 0.0
    have_comm = True
    prev: tuple[float, float] | None = None
    while engine.has_unfinished_requests():
        rec.last = None
        t0 = time.perf_counter()
        outs = engine.step()
        wall = time.perf_counter() - t0
        if any(o.error for o in outs):
            raise RuntimeError(next(o.error for o in outs if o.error))
        if rec.last is None:
            continue
        sched, timings = rec.last
        decode = all(len(s.token_ids) == 1 and s.start_pos >= len(prompts[0]) for s in sched.seqs)
        now = _comm(timings)
        have_comm = have_comm and now is not None
        if decode:
            decode_s.append(wall)
            if have_comm and prev is not None:
                comm_s += now[0] - prev[0]
                comm_calls += now[1] - prev[1]
        else:
            prefill_s += wall
        prev = now
    total_decode = sum(decode_s)
    n = max(1, len(decode_s))
    return {"prefill_ms": prefill_s * 1e3, "tpot_ms": total_decode / n * 1e3, "decode_steps": len(decode_s),
            "comm_share": comm_s / total_decode if have_comm and total_decode else None,
            "comm_ms_per_step": comm_s / n * 1e3 if have_comm else None,
            "comm_calls_per_step": comm_calls / n if have_comm else None}


def _median(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r[key] is not None]
    return statistics.median(vals) if vals else None


def run(args: argparse.Namespace) -> int:
    import torch

    from shardserve.bench.bandwidth import copy_bandwidth_gbps, decode_weight_bytes, device_name
    from shardserve.bench.comm import _hardware
    from shardserve.distributed.parallel_state import enable_collective_timing
    from shardserve.config import resolve_device
    from shardserve.engine.args import EngineArgs
    from shardserve.entrypoints.llm import LLM
    batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1 or args.input_len < 1 or args.output_len < 2 or args.iters < 1:
        raise ValueError("need --batch-sizes >= 1, --input-len >= 1, --output-len >= 2 (one decode step) and "
                         "--iters >= 1")
    if args.allreduce == "shm" and args.disable_custom_all_reduce:
        raise ValueError("--allreduce shm contradicts --disable-custom-all-reduce (which sends every all-reduce "
                         "through the process group); drop one of them")
    if args.compare_llamacpp:  # before the engine runs: a missing package or file is a clear error at once
        from shardserve.bench.llamacpp_peer import check_available
        check_available(args.compare_llamacpp)
        if 1 not in batch_sizes:
            raise ValueError("--compare-llamacpp compares batch 1 only (llama-cpp-python decodes one sequence at a "
                             "time); include 1 in --batch-sizes")
    if args.allreduce:
        os.environ["SHARDSERVE_ALLREDUCE"] = args.allreduce  # inherited by the rank processes
    if not args.no_comm_timing:
        os.environ["SHARDSERVE_COMM_TIMING"] = "1"
        enable_collective_timing(True)  # ranks in this process (tp = 1)
    eargs = EngineArgs.from_cli(args)
    threads = torch.get_num_threads()  # the engine's threads (split among the ranks at tp > 1); the peer's too
    # the memory yardstick first, while the device is empty (the engine takes most of a GPU's memory)
    copy_gbps = copy_bandwidth_gbps(resolve_device(eargs.device))
    llm = LLM(**vars(eargs), use_tqdm_on_load=False)
    try:
        engine = llm.engine
        rec = _StepRecorder(engine.executor)
        tok = llm.get_tokenizer()
        vocab = min(len(tok), engine.cfg.model.vocab_size) if tok is not None else engine.cfg.model.vocab_size
        special = set(tok.all_special_ids) if tok is not None else set(engine.eos_token_ids)  # --skip-tokenizer-init
        pool = [t for t in range(vocab) if t not in special]
        rng = random.Random(0)
        rows = []
        batch1_prompts: list[list[int]] = []  # the batch-1 prompts, warm-up first: the llama.cpp peer's too
        for b in batch_sizes:
            runs = []
            for it in range(args.iters + 1):  # run 0 warms up
                prompts = [[rng.choice(pool) for _ in range(args.input_len)] for _ in range(b)]
                if b == 1 and len(batch1_prompts) < args.iters + 1:
                    batch1_prompts.append(prompts[0])
                r = _one_run(engine, rec, prompts, args.output_len, f"b{b}-{it}")
                if it:
                    runs.append(r)
            row = {"batch_size": b, "input_len": args.input_len, "output_len": args.output_len,
                   **{k: _median(runs, k) for k in runs[0]}, "runs": runs}
            row["decode_tok_s"] = b / row["tpot_ms"] * 1e3 if row["tpot_ms"] else None
            rows.append(row)
        cfg = engine.cfg
        weight_bytes = decode_weight_bytes(cfg.model.hf_config, cfg.model.dtype)
        devices = cfg.parallel.tensor_parallel_size  # pipeline stages read their weights one after another
        for row in rows:  # weights are read once per step whatever the batch: bytes / TPOT
            row["weight_gbps"] = weight_bytes / (row["tpot_ms"] / 1e3) / 1e9 if row["tpot_ms"] else None
            row["bw_share"] = row["weight_gbps"] / (copy_gbps * devices) if row["weight_gbps"] else None
    finally:
        llm.shutdown()
    peer = peer_info = None
    if args.compare_llamacpp:  # after the engine has let go of the cores and memory
        from shardserve.bench.llamacpp_peer import latency_rows
        peer, peer_info = latency_rows(args.compare_llamacpp, batch1_prompts, args.output_len, threads,
                                       gpu=cfg.device.startswith("cuda"))
        eng1 = next(r for r in rows if r["batch_size"] == 1)
        peer["decode_ratio"] = peer["tpot_ms"] / eng1["tpot_ms"] if peer["tpot_ms"] and eng1["tpot_ms"] else None
        peer["prefill_ratio"] = peer["prefill_ms"] / eng1["prefill_ms"] if eng1["prefill_ms"] else None
    tp = eargs.tensor_parallel_size
    mode = _allreduce_label(tp, cfg.device, cfg.parallel.disable_custom_all_reduce)
    print(f"\nbench latency: tp={tp} pp={eargs.pipeline_parallel_size} allreduce={mode}, input {args.input_len}, "
          f"output {args.output_len}, median of {args.iters} runs ({device_name(cfg.device, _hardware())})")
    print(f"weights read per decode step: {weight_bytes / 1e9:.3f} GB; measured copy bandwidth {copy_gbps:.1f} GB/s "
          f"per device ({cfg.device}; tp {devices} devices read in parallel)")
    print(f"{'batch':>5} {'prefill ms':>11} {'TPOT ms':>8} {'decode tok/s':>13} {'weight GB/s':>12} {'of copy bw':>11} "
          f"{'comm share':>11} {'comm ms/step':>13} {'calls/step':>11}")
    for r in rows:
        share = f"{r['comm_share'] * 100:.1f}%" if r["comm_share"] is not None else "n/a"
        cms = f"{r['comm_ms_per_step']:.2f}" if r["comm_ms_per_step"] is not None else "n/a"
        calls = f"{r['comm_calls_per_step']:.0f}" if r["comm_calls_per_step"] is not None else "n/a"
        wbw = f"{r['weight_gbps']:.1f}" if r["weight_gbps"] is not None else "n/a"
        bws = f"{r['bw_share'] * 100:.1f}%" if r["bw_share"] is not None else "n/a"
        print(f"{r['batch_size']:>5} {r['prefill_ms']:>11.1f} {r['tpot_ms']:>8.2f} {r['decode_tok_s']:>13.1f} "
              f"{wbw:>12} {bws:>11} {share:>11} {cms:>13} {calls:>11}")
    if tp > 1 and rows and rows[0]["comm_share"] is None and not args.no_comm_timing:
        print("comm share n/a: the driver rank does not report collective_stats() in its step timings")
    if peer is not None:
        _print_llamacpp(peer, peer_info, eng1, batch_sizes)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"tp": tp, "pp": eargs.pipeline_parallel_size, "allreduce": mode, "hardware": device_name(cfg.device, _hardware()),
                       "dtype": str(cfg.model.dtype).removeprefix("torch."),
                       "weight_bytes_per_step": weight_bytes, "copy_gbps": copy_gbps,
                       "torch": torch.__version__, "model": engine.cfg.model.model, "threads": threads,
                       "results": rows,
                       **({"llamacpp": {**peer_info, "batch_size": 1, "results": [peer]}} if peer else {})},
                      f, indent=2)
    return 0


def _print_llamacpp(peer: dict, info: dict, eng1: dict, batch_sizes: list[int]) -> None:
    """The llama.cpp row (batch 1) and the ratios: engine speed / llama.cpp speed, > 1 when the engine is faster."""
    print(f"\nllama.cpp peer: llama-cpp-python {info['llama_cpp_python']}, {info['gguf']}, {info['threads']} "
          f"threads, batch 1, the engine's batch-1 prompt token ids, {peer['output_tokens']} output tokens "
          f"(EOS ignored), greedy, median of {len(peer['runs'])} runs")
    print(f"{'batch':>5} {'prefill ms':>11} {'TPOT ms':>8} {'decode tok/s':>13}")
    tps = f"{peer['decode_tok_s']:.1f}" if peer["decode_tok_s"] else "n/a"
    print(f"{1:>5} {peer['prefill_ms']:>11.1f} {peer['tpot_ms']:>8.2f} {tps:>13}")
    if peer["decode_ratio"] is not None:
        print(f"ratio (engine / llama.cpp, batch 1): decode {peer['decode_ratio']:.2f}x "
              f"(TPOT {eng1['tpot_ms']:.2f} vs {peer['tpot_ms']:.2f} ms), prefill {peer['prefill_ratio']:.2f}x "
              f"({eng1['prefill_ms']:.1f} vs {peer['prefill_ms']:.1f} ms)")
    others = [b for b in batch_sizes if b != 1]
    if others:
        print(f"batch {','.join(map(str, others))}: no llama.cpp row (llama-cpp-python decodes one sequence at a "
              "time)")
