"""`shardserve bench moe`: one MoE layer on N CPU ranks, tensor-parallel experts vs expert parallelism.

Mixtral-shaped by default (random weights): layer time, time in the all-reduce, bytes moved per token (and what an
all-to-all would move for the same routing), expert slots per rank, and a check that every layout gives the same
output. Ranks are separate processes (`python -m shardserve.bench.moe` with a JSON spec in the environment)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SPEC_ENV = "SHARDSERVE_BENCH_MOE_SPEC"
MODES = ("tp", "ep:linear", "ep:round_robin")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-ranks", type=int, default=2, help="ranks sharing the MoE layer (tp = ep size)")
    p.add_argument("--hidden-size", type=int, default=1024, help="hidden size (Mixtral 8x7B: 4096)")
    p.add_argument("--intermediate-size", type=int, default=3584, help="expert intermediate size (Mixtral: 14336)")
    p.add_argument("--num-experts", type=int, default=8, help="routed experts")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--tokens", default="1,16,256,1024", help="comma-separated batch sizes (tokens per step)")
    p.add_argument("--iters", type=int, default=10, help="timed forwards per batch size and mode (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards first")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and activations")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--allreduce", choices=["auto", "gloo", "shm"], default=None,
                   help="all-reduce implementation of the ranks (default: $SHARDSERVE_ALLREDUCE, else auto)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before the ranks are killed")
    p.add_argument("--output-json", default=None, help="write the results to this JSON file")


# ------------------------------------------------------------------------------------------------ one rank

class _CountingGroup:
    """Wraps a GroupCoordinator: counts the bytes handed to all_reduce and the seconds spent in it."""

    def __init__(self, group: Any) -> None:
        self._g = group
        self.world_size, self.rank_in_group = group.world_size, group.rank_in_group
        self.bytes = 0
        self.seconds = 0.0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self._g.all_reduce(t)
        self.seconds += time.perf_counter() - t0
        self.bytes += t.numel() * t.element_size()
        return out


def _build_layer(spec: dict, group: _CountingGroup, mode: str) -> Any:
    """The MoE block of `mode` on this rank, filled through the real weight loaders from seeded tensors (each rank
    generates only the experts it loads, expert by expert)."""
    from shardserve.layers.lazy_tensor import LazyTensor
    from shardserve.layers.moe import FusedMoE, SparseMoeBlock
    from shardserve.models.base import ModelShard
    dtype = getattr(torch, spec["dtype"])
    ep = mode.startswith("ep")
    placement = mode.split(":")[1] if ep else "linear"
    shard = ModelShard(tp=group, start_layer=0, end_layer=1, ep=group if ep else None, expert_placement=placement)
    h, i = spec["hidden_size"], spec["intermediate_size"]
    experts = FusedMoE(spec["num_experts"], spec["top_k"], h, i, True, shard, dtype)
    block = SparseMoeBlock(experts, dtype)
    for e in experts.owned:
        g = torch.Generator().manual_seed(1000 + e)
        for shard_id, shape in (("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i))):
            w = (torch.randn(shape, generator=g) * shape[1] ** -0.5).to(dtype)
            experts.load_expert(LazyTensor.wrap(w), shard_id, e)
    g = torch.Generator().manual_seed(7)
    block.gate.weight.data.copy_(torch.randn(spec["num_experts"], h, generator=g) * h ** -0.5)
    return block


def _time_mode(spec: dict, pstate: Any, mode: str) -> tuple[list[dict], list[torch.Tensor]]:
    from shardserve.layers.moe import select_experts
    group = _CountingGroup(pstate.tp)
    block = _build_layer(spec, group, mode)
    experts = block.experts
    dtype = getattr(torch, spec["dtype"])
    placement = mode.split(":")[1] if mode.startswith("ep") else "linear"
    rows, outputs = [], []
    for n in spec["tokens"]:
        x = torch.randn(n, spec["hidden_size"], generator=torch.Generator().manual_seed(n)).to(dtype)
        with torch.inference_mode():
            for _ in range(spec["warmup"]):
                out = block(x)
            group.bytes = 0
            layer_s, comm_s = [], []
            for _ in range(spec["iters"]):  # each forward starts together; the median resists a busy host
                pstate.tp.barrier()
                group.seconds = 0.0
                t0 = time.perf_counter()
                out = block(x)
                layer_s.append(time.perf_counter() - t0)
                comm_s.append(group.seconds)
            _, ids = select_experts(block.gate(x), experts.top_k, True)
        local_slots = int((experts.expert_map[ids] >= 0).sum())  # (token, k) slots this rank computes
        stats = torch.tensor([[_median(layer_s), _median(comm_s), float(local_slots)]], dtype=torch.float64)
        every = pstate.tp.all_gather(stats, dim=0)  # [ranks, 3]
        rows.append({"mode": mode, "tokens": n, "allreduce_impl": getattr(pstate.tp, "last_impl", "gloo"),
                     "layer_ms": 1e3 * every[:, 0].max().item(),
                     "comm_ms": 1e3 * every[:, 1].mean().item(),
                     "allreduce_payload_bytes_per_token": group.bytes / spec["iters"] / n,
                     "slots_per_rank": [int(v) for v in every[:, 2].tolist()],
                     "alltoall_sent_bytes_per_token_per_rank":
                         _alltoall_sent_bytes(ids, pstate.tp.world_size, placement, spec) / n})
        outputs.append(out.float())
    return rows, outputs


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _alltoall_sent_bytes(ids: torch.Tensor, ranks: int, placement: str, spec: dict) -> float:
    """Bytes one rank would send, on average, for an all-to-all dispatch + combine of this routing, were each token
    held by one rank (token t on rank t % ranks) and sent once to every other rank owning one of its experts."""
    from shardserve.layers.moe import local_experts
    owner = torch.empty(spec["num_experts"], dtype=torch.int64)
    for r in range(ranks):
        owner[torch.tensor(local_experts(spec["num_experts"], ranks, r, placement))] = r
    home = torch.arange(ids.shape[0]) % ranks  # [tokens]
    dest = owner[ids]  # [tokens, top_k]
    remote = sum(((dest == r).any(-1) & (home != r)).sum().item() for r in range(ranks))
    item = torch.empty(0, dtype=getattr(torch, spec["dtype"])).element_size()
    return 2.0 * remote * spec["hidden_size"] * item / ranks  # x2: tokens out, results back


def _rank_main(spec: dict) -> int:
    from shardserve.distributed.parallel_state import build_parallel_state, destroy_distributed, init_distributed
    torch.set_num_threads(spec["threads"])
    rank, world = spec["rank"], spec["world_size"]
    init_distributed(rank, world, spec["init_method"], "gloo", timeout_s=spec["timeout"])
    pstate = build_parallel_state(tp_size=world)
    results, reference = [], None
    for mode in spec["modes"]:
        rows, outputs = _time_mode(spec, pstate, mode)
        if reference is None:
            reference = outputs
        for row, out, ref in zip(rows, outputs, reference):
            row["max_abs_diff_vs_first_mode"] = (out - ref).abs().max().item()
        results.extend(rows)
    if rank == 0:
        with open(spec["out"], "w") as f:
            json.dump(results, f)
    destroy_distributed()
    return 0


# ------------------------------------------------------------------------------------------------ driver

def _launch(spec: dict, n: int, timeout: float) -> None:
    from shardserve.utils.network import get_free_port, get_loopback_ip, tcp_init_method
    init = tcp_init_method(get_loopback_ip(), get_free_port())
    procs = []
    for rank in range(n):
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]),
               **({"SHARDSERVE_ALLREDUCE": spec["allreduce"]} if spec["allreduce"] else {}),
               SPEC_ENV: json.dumps({**spec, "rank": rank, "world_size": n, "init_method": init})}
        procs.append(subprocess.Popen([sys.executable, "-m", "shardserve.bench.moe"], env=env))
    deadline = time.monotonic() + timeout
    try:
        while (codes := [p.poll() for p in procs]).count(0) < n:
            if any(c not in (None, 0) for c in codes):
                raise RuntimeError(f"bench moe: ranks exited with codes {codes} (None: still running); "
                                   "see their output above")
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench moe: ranks still running after {timeout:.0f} s; killed")
            time.sleep(0.05)
    finally:
        _kill([p for p in procs if p.poll() is None])


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def _print_table(rows: list[dict]) -> None:
    print(f"all-reduce implementation: {sorted({r['allreduce_impl'] for r in rows})}")
    print(f"{'mode':<16}{'tokens':>7}{'layer ms':>10}{'comm ms':>9}{'AR payload':>12}{'AR sent':>9}"
          f"{'a2a sent':>10}{'a2a+AG':>8}  {'slots per rank':<18}max diff")
    for r in rows:
        print(f"{r['mode']:<16}{r['tokens']:>7}{r['layer_ms']:>10.3f}{r['comm_ms']:>9.3f}"
              f"{r['allreduce_payload_bytes_per_token']:>12.0f}{r['allreduce_sent_bytes_per_token_per_rank']:>9.0f}"
              f"{r['alltoall_sent_bytes_per_token_per_rank']:>10.0f}"
              f"{r['alltoall_allgather_sent_bytes_per_token_per_rank']:>8.0f}  {str(r['slots_per_rank']):<18}"
              f"{r['max_abs_diff_vs_first_mode']:.1e}")
    print("bytes are per token; 'sent' = bytes one rank sends (ring all-reduce: 2 (n-1)/n of the payload; a2a: "
          "dispatch + combine were tokens sharded; a2a+AG: plus the all-gather that re-replicates the output)")


def run(args: argparse.Namespace) -> int:
    n = args.num_ranks
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        print(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    if n < 2 or args.num_experts % n or args.intermediate_size % n:
        print(f"--num-ranks {n} must be >= 2 and divide --num-experts ({args.num_experts}) and "
              f"--intermediate-size ({args.intermediate_size})", file=sys.stderr)
        return 2
    if not 1 <= args.top_k <= args.num_experts:
        print(f"--top-k {args.top_k} must be between 1 and --num-experts ({args.num_experts})", file=sys.stderr)
        return 2
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    with tempfile.TemporaryDirectory(prefix="ss_bench_moe_") as tmp:
        spec = {"hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
                "num_experts": args.num_experts, "top_k": args.top_k, "tokens": tokens, "iters": args.iters,
                "warmup": args.warmup, "dtype": args.dtype, "threads": args.threads, "modes": modes,
                "allreduce": args.allreduce,
                "timeout": args.timeout, "out": os.path.join(tmp, "result.json")}
        t0 = time.perf_counter()
        _launch(spec, n, args.timeout)
        with open(spec["out"]) as f:
            rows = json.load(f)
    for r in rows:  # a ring all-reduce sends 2 (n - 1) / n of the payload per rank; an all-gather (n - 1) / n
        payload = r["allreduce_payload_bytes_per_token"]
        r["allreduce_sent_bytes_per_token_per_rank"] = payload * 2 * (n - 1) / n
        r["alltoall_allgather_sent_bytes_per_token_per_rank"] = \
            r["alltoall_sent_bytes_per_token_per_rank"] + payload * (n - 1) / n
    print(f"MoE layer: hidden {args.hidden_size}, expert intermediate {args.intermediate_size}, "
          f"{args.num_experts} experts, top-{args.top_k}, {args.dtype}, {n} CPU ranks, "
          f"{args.threads} thread(s) each")
    _print_table(rows)
    res = {"config": {k: v for k, v in spec.items() if k not in ("out", "timeout")} | {"num_ranks": n},
           "results": rows, "wall_s": time.perf_counter() - t0,
           "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "torch": torch.__version__, "argv": sys.argv}
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main(json.loads(os.environ[SPEC_ENV])))
