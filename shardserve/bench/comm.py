"""`shardserve bench comm`: latency and algorithm/bus bandwidth of all_reduce, all_gather, reduce_scatter and
send/recv on N local ranks (one process each), per message size, as nccl-tests defines them.

bytes: all_reduce and send_recv the tensor on each rank; all_gather the gathered output; reduce_scatter the
input (so each rank contributes or keeps bytes / N). algbw = bytes / time; busbw = algbw x 2(N-1)/N
(all_reduce), x (N-1)/N (all_gather, reduce_scatter), x 1 (send_recv: every rank sends to the next and
receives from the previous at once). Time per call: --iters calls in 5 batches, each batch's mean taken on
the slowest rank, then the median batch (robust to a busy neighbour on a shared host).
Ranks run `python -m shardserve.bench.comm` with a JSON spec in the environment (no pickle).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch

__all__ = ["add_args", "bus_factor", "run"]

OPS = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
BACKENDS = ("auto", "gloo", "shm", "nccl", "custom")
SPEC_ENV = "SHARDSERVE_BENCH_COMM_SPEC"
BATCHES = 5  # timed batches per size; the median batch is reported
TIME_PER_SIZE_S = 1.0  # fewer iterations for a size whose warm-up says --iters would take longer
SETTLE_S = 0.5  # small all_reduces before the first size (see _rank_main)


def bus_factor(op: str, n: int) -> float:
    """busbw / algbw of `op` on `n` ranks."""
    return {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
            "send_recv": 1.0}[op]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--ranks", type=int, default=2, help="processes (ranks) on this host")
    p.add_argument("--backend", default="auto",
                   help="auto (shm up to its limit, then gloo), gloo, shm, nccl (CUDA, one GPU per rank) or custom "
                        "(CUDA, one GPU per rank: the one-shot CUDA-IPC all-reduce up to 2 MiB, NCCL above); a "
                        "comma list runs each in turn, e.g. shm,gloo or custom,nccl")
    p.add_argument("--ops", default=",".join(OPS), help="comma list of " + ", ".join(OPS))
    p.add_argument("--min-bytes", default="4", help="smallest message, e.g. 4 or 1KiB")
    p.add_argument("--max-bytes", default="64MiB", help="largest message")
    p.add_argument("--step-factor", type=int, default=4, choices=[2, 4], help="message size ratio")
    p.add_argument("--iters", type=int, default=200, help="timed calls per size (fewer for slow large sizes)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per size")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="give up on a backend's run after this long")
    p.add_argument("--output-json", default=None, help="write {'results': [...]} to this file")


def _sizes(lo: int, hi: int, factor: int) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= factor
    return out


def run(args: argparse.Namespace) -> int:
    from shardserve.config import parse_size
    n = args.ranks
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    lo, hi = parse_size(args.min_bytes), parse_size(args.max_bytes)
    if n < 2:
        raise ValueError(f"--ranks {n}: collectives need at least 2 ranks")
    if bad := [b for b in backends if b not in BACKENDS]:
        raise ValueError(f"--backend {','.join(bad)} unknown; use one or more of {', '.join(BACKENDS)}")
    if bad := [o for o in ops if o not in OPS]:
        raise ValueError(f"--ops {','.join(bad)} unknown; use one or more of {', '.join(OPS)}")
    if not 1 <= lo <= hi:
        raise ValueError(f"need 1 <= --min-bytes <= --max-bytes, got {lo} and {hi}")
    if "nccl" in backends and torch.cuda.device_count() < n:
        raise ValueError(f"--backend nccl needs {n} CUDA GPUs, found {torch.cuda.device_count()}; on CPU use "
                         "--backend auto, shm or gloo")
    if "custom" in backends and torch.cuda.device_count() < n:
        raise ValueError(f"--backend custom is the GPU custom all-reduce and needs {n} CUDA GPUs (one per rank: ranks "
                         f"sharing a GPU time-slice its spinning kernels), found {torch.cuda.device_count()}; on CPU "
                         "use --backend shm")
    sizes = _sizes(lo, hi, args.step_factor)
    results: list[dict] = []
    for backend in backends:
        todo = [o for o in ops if not (o == "send_recv" and backend == "shm")]  # no shm point-to-point path
        if todo:
            results += _launch(backend, n, todo, sizes, args)
    _print(results, n)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"results": results, "ranks": n, "hardware": _hardware(), "torch": torch.__version__}, f,
                      indent=2)
    return 0


def _hardware() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"{model or 'unknown CPU'}, {os.cpu_count()} cores"


def _launch(backend: str, n: int, ops: list[str], sizes: list[int], args: argparse.Namespace) -> list[dict]:
    """Run one backend's measurements on `n` fresh rank processes; rank 0's results."""
    from shardserve.utils.network import get_free_port, get_loopback_ip, tcp_init_method
    threads = max(1, (os.cpu_count() or 1) // n)
    with tempfile.TemporaryDirectory(prefix="ss_bench_comm_") as tmp:
        out_path = os.path.join(tmp, "results.json")
        spec = {"world_size": n, "backend": backend, "ops": ops, "sizes": sizes, "iters": args.iters,
                "warmup": args.warmup, "threads": threads, "out": out_path,
                "init_method": tcp_init_method(get_loopback_ip(), get_free_port())}
        procs = []
        for rank in range(n):
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), **{SPEC_ENV: json.dumps({**spec, "rank": rank})})
            procs.append(subprocess.Popen([sys.executable, "-m", "shardserve.bench.comm"], env=env))
        deadline = time.monotonic() + args.timeout_s
        try:
            while any(p.poll() is None for p in procs):
                failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode not in (None, 0)]
                if failed:
                    raise RuntimeError(f"bench comm ({backend}): rank {failed[0][0]} exited with code "
                                       f"{failed[0][1]} (its error is above)")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bench comm ({backend}) still running after {args.timeout_s:.0f} s")
                time.sleep(0.05)
            if any(p.returncode for p in procs):
                raise RuntimeError(f"bench comm ({backend}): exit codes {[p.returncode for p in procs]}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        with open(out_path) as f:
            return json.load(f)["results"]


def _print(results: list[dict], n: int) -> None:
    """One table per op: a latency / algbw / busbw column group per backend, then ratios to the first."""
    for op in OPS:
        rows = [r for r in results if r["op"] == op]
        if not rows:
            continue
        backends = list(dict.fromkeys(r["backend"] for r in rows))
        by = {(r["backend"], r["bytes"]): r for r in rows}
        print(f"\n{op}, {n} ranks, float32 (latency us, algbw / busbw GB/s)")
        head = f"{'bytes':>10}" + "".join(f" | {b + ' (impl)':>13} {'us':>9} {'algbw':>7} {'busbw':>7}"
                                            for b in backends)
        head += "".join(f" | {b + '/' + backends[0]:>11}" for b in backends[1:])
        print(head)
        print("-" * len(head))
        for size in sorted({r["bytes"] for r in rows}):
            line = f"{size:>10}"
            for b in backends:
                r = by.get((b, size))
                line += (f" | {r['impl']:>13} {r['latency_us']:>9.1f} {r['algbw_gbps']:>7.3f} {r['busbw_gbps']:>7.3f}"
                         if r else f" | {'':>13} {'-':>9} {'-':>7} {'-':>7}")
            for b in backends[1:]:
                a, r = by.get((backends[0], size)), by.get((b, size))
                line += f" | {r['latency_us'] / a['latency_us']:>10.1f}x" if a and r else f" | {'-':>11}"
            print(line)


# ------------------------------------------------------------------------------------------------ rank side


def _op(name: str, g: Any, nbytes: int, device: torch.device) -> tuple[Callable[[], Any], int]:
    """A closure running `name` once on group `g`, and the message bytes it moves (nccl-tests' definition)."""
    import torch.distributed as dist
    n = g.world_size
    count = max(1, nbytes // 4)
    if name in ("all_gather", "reduce_scatter"):
        count = max(n, count // n * n)  # divisible by the group
    if name == "all_reduce":
        x = torch.zeros(count, device=device)
        return (lambda: g.all_reduce(x)), count * 4
    if name == "all_gather":
        x = torch.zeros(count // n, device=device)
        return (lambda: g.all_gather(x, 0)), count * 4
    if name == "reduce_scatter":
        x = torch.zeros(count, device=device)
        return (lambda: g.reduce_scatter(x, 0)), count * 4
    send, recv = torch.zeros(count, device=device), torch.empty(count, device=device)
    pg = g.device_group
    nxt, prv = g.ranks[g.next_rank], g.ranks[g.prev_rank]

    def send_recv() -> None:
        works = [dist.isend(send, nxt, group=pg), dist.irecv(recv, prv, group=pg)]
        for w in works:
            w.wait()
    return send_recv, count * 4


def _rank_main(spec: dict) -> int:
    import torch.distributed as dist
    from tqdm import tqdm

    from shardserve.distributed.parallel_state import build_parallel_state, destroy_distributed, init_distributed
    rank, n, backend = spec["rank"], spec["world_size"], spec["backend"]
    torch.set_num_threads(spec["threads"])
    cuda = backend in ("nccl", "custom")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    pg = "nccl" if cuda else "gloo"
    init_distributed(rank, n, spec["init_method"], pg, timeout_s=300)
    g = build_parallel_state(n, backend=pg, device=device, allreduce="gloo" if cuda else backend,
                             custom_allreduce=backend == "custom").tp
    if backend == "custom" and g.custom is None:
        raise RuntimeError("--backend custom: the custom all-reduce did not come up (see the log for why)")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # settle: small all_reduces for SETTLE_S (rank 0's clock decides, the reduced flag tells everyone), so the
    # first sizes are not measured while the OS is still spreading the new processes over the cores
    flag, t_end = torch.zeros(1, device=device), time.perf_counter() + SETTLE_S
    while True:
        flag.fill_(float(rank == 0 and time.perf_counter() > t_end))
        if g.all_reduce(flag).item() > 0:
            break
    work = [(op, size) for op in spec["ops"] for size in spec["sizes"]]
    results = []
    for op, size in tqdm(work, desc=f"bench comm {backend}", unit="size", disable=rank != 0):
        fn, nbytes = _op(op, g, size, device)
        t0 = time.perf_counter()
        for _ in range(spec["warmup"]):
            fn()
        sync()
        per_call = (time.perf_counter() - t0) / max(1, spec["warmup"])
        # every rank must run the same number of calls: rank 0 decides
        iters = g.broadcast_object(max(1, min(spec["iters"], int(TIME_PER_SIZE_S / max(per_call, 1e-9))) // BATCHES))
        batch_s = []
        for _ in range(BATCHES):
            g.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            elapsed = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=g.cpu_group)  # the slowest rank's time
            batch_s.append(float(elapsed.item()))
        secs = sorted(batch_s)[BATCHES // 2]
        iters *= BATCHES
        algbw = nbytes / secs / 1e9
        results.append({"op": op, "backend": backend, "impl": g.last_impl if op != "send_recv" else g.backend,
                        "ranks": n, "bytes": nbytes, "iters": iters, "latency_us": secs * 1e6,
                        "algbw_gbps": algbw, "busbw_gbps": algbw * bus_factor(op, n)})
    if rank == 0:
        with open(spec["out"] + ".tmp", "w") as f:
            json.dump({"results": results}, f)
        os.replace(spec["out"] + ".tmp", spec["out"])
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main(json.loads(os.environ[SPEC_ENV])))
