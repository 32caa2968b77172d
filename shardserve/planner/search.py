"""Layout search: enumerate (tp, pp, dp, ep) candidates, size and time each, and recommend one.

Objective: with batch 1, the lowest single-sequence decode latency; with a batch, the highest
aggregate output throughput at that batch; with a request rate, the layouts that sustain it, best
per-token latency first; with neither, the highest throughput with memory filled (at most
MAX_NUM_SEQS sequences per replica).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shardserve.planner.cost import LayoutCost
from shardserve.planner.hardware import Cluster, GiB, PlannerError
from shardserve.planner.memory import DTYPE_BYTES, MAX_NUM_SEQS, PREFILL_CHUNK_TOKENS, RUNTIME_OVERHEAD_BYTES, \
    ModelSpec, activation_bytes, kv_bytes_per_token

Shape = tuple[int, int, int, int]  # (tp, pp, dp, ep)


@dataclass(frozen=True)
class Request:
    """What the user wants to run: precision, context and load."""

    dtype: str = "bf16"
    kv_dtype: str = "bf16"
    max_model_len: int | None = None  # None: min(model max, 8192), at least isl + osl
    batch: int | None = None  # concurrent sequences in the whole cluster
    rate: float | None = None  # requests per second
    isl: int = 1024
    osl: int = 256
    chunk_tokens: int = PREFILL_CHUNK_TOKENS
    max_num_seqs: int = MAX_NUM_SEQS

    def context_len(self, spec: ModelSpec) -> int:
        if self.max_model_len is not None:
            if self.max_model_len < self.isl + self.osl:
                raise PlannerError(f"--max-model-len {self.max_model_len} is shorter than --isl + --osl "
                                   f"({self.isl + self.osl})")
            return self.max_model_len
        return max(min(spec.max_position_embeddings, 8192), self.isl + self.osl)

    @property
    def objective(self) -> str:
        if self.batch == 1:
            return "latency"
        return "rate" if self.rate is not None else "throughput"


@dataclass
class MemoryPerDevice:
    """Bytes on the fullest device of a layout; `free` is what is left for more KV cache."""

    weights: int
    kv_cache: int
    activations: int
    overhead: int
    free: int


@dataclass
class Layout:
    """One candidate layout with its memory and predicted performance (None when it does not fit)."""

    tp: int
    pp: int
    dp: int
    ep: int
    fits: bool
    memory_per_device: MemoryPerDevice
    max_concurrent_seqs: int
    prefill_latency_s: float | None = None
    decode_tok_s_per_seq: float | None = None
    throughput_tok_s: float | None = None
    batch: int = 0  # concurrent sequences the predictions assume
    sustains_rate: bool | None = None
    notes: list[str] = field(default_factory=list)
    device_order: list[int] | None = None  # physical GPU order (TP groups consecutive), local plans only

    @property
    def shape(self) -> Shape:
        return (self.tp, self.pp, self.dp, self.ep)

    def label(self) -> str:
        parts = [f"tp={self.tp}"] + [f"{k}={v}" for k, v in (("pp", self.pp), ("dp", self.dp), ("ep", self.ep)) if v > 1]
        return ", ".join(parts)

    def to_dict(self) -> dict:
        out = {
            "tp": self.tp, "pp": self.pp, "dp": self.dp, "ep": self.ep, "fits": self.fits,
            "memory_per_device": dict(vars(self.memory_per_device)),
            "max_concurrent_seqs": self.max_concurrent_seqs,
            "prefill_latency_s": _round(self.prefill_latency_s),
            "decode_tok_s_per_seq": _round(self.decode_tok_s_per_seq),
            "throughput_tok_s": _round(self.throughput_tok_s),
            "batch": self.batch,
        }
        if self.sustains_rate is not None:
            out["sustains_rate"] = self.sustains_rate
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_shapes(spec: ModelSpec, cluster: Cluster,
                     engine_only: bool = False) -> tuple[list[Shape], list[tuple[Shape, str]]]:
    """Every (tp, pp, dp, ep) with tp*pp*dp = the cluster's GPUs, and those excluded with the reason. With
    `engine_only`, also those this engine cannot run are excluded (planner/engine_support.py)."""
    ok, excluded = _enumerate_shapes(spec, cluster)
    if not engine_only:
        return ok, excluded
    from shardserve.planner.engine_support import shape_problem
    runnable = []
    for shape in ok:
        problem = shape_problem(spec, cluster, shape)
        if problem:
            excluded.append((shape, problem))
        else:
            runnable.append(shape)
    return runnable, excluded


def _enumerate_shapes(spec: ModelSpec, cluster: Cluster) -> tuple[list[Shape], list[tuple[Shape, str]]]:
    n, gpn = cluster.num_gpus, cluster.gpus_per_node
    ok: list[Shape] = []
    excluded: list[tuple[Shape, str]] = []
    for tp in _divisors(n):
        reason = None
        if tp > gpn or gpn % tp:
            reason = f"tp={tp} would span nodes ({gpn} GPUs per node)"
        elif tp > spec.num_heads:  # heads that do not divide are split unevenly (layers/tp_split.py)
            reason = f"tp={tp} exceeds the {spec.num_heads} attention heads (every rank needs one)"
        elif tp > spec.intermediate_size:
            reason = f"tp={tp} exceeds the MLP's {spec.intermediate_size} columns (every rank needs one)"
        for pp in _divisors(n // tp):
            dp = n // (tp * pp)
            if reason:
                excluded.append(((tp, pp, dp, 1), reason))
                continue
            if pp > spec.num_layers:
                excluded.append(((tp, pp, dp, 1), f"pp={pp} exceeds the {spec.num_layers} layers"))
                continue
            ok.append((tp, pp, dp, 1))
            if not spec.is_moe:
                continue
            # ep = tp: experts split over the TP group; ep = k*tp: over k whole replicas (DP attention)
            for k in _divisors(dp):
                ep = k * tp
                if ep == 1:
                    continue
                if spec.num_experts % ep:
                    excluded.append(((tp, pp, dp, ep), f"{spec.num_experts} experts not divisible by ep={ep}"))
                else:
                    ok.append((tp, pp, dp, ep))
    return ok, excluded


@dataclass
class _Stages:
    """Per-stage memory facts of one shape (index = pipeline stage)."""

    weights: list[float]
    activations: list[float]
    kv_per_token: list[int]


def _stage_memory(spec: ModelSpec, cost: LayoutCost, req: Request) -> _Stages:
    chunk = min(req.chunk_tokens, req.context_len(spec))
    kvb = DTYPE_BYTES[req.kv_dtype]
    return _Stages(
        weights=[w.total for w in cost.weights],
        activations=[activation_bytes(spec, cost.tp, 2, s == cost.pp - 1, chunk) for s in range(cost.pp)],
        kv_per_token=[kv_bytes_per_token(spec, kvb, cost.tp, len(layers)) for layers in cost.stages],
    )


def evaluate(spec: ModelSpec, cluster: Cluster, shape: Shape, req: Request, with_perf: bool = True) -> Layout:
    """Memory per device, capacity and (if it fits and with_perf) predicted performance of one shape."""
    tp, pp, dp, ep = shape
    cost = LayoutCost(spec, cluster, tp, pp, dp, ep, req.dtype, req.kv_dtype)
    st = _stage_memory(spec, cost, req)
    mem, ctx, max_len = cluster.gpu.memory_bytes, req.isl + req.osl, req.context_len(spec)
    room = [mem - w - a - RUNTIME_OVERHEAD_BYTES for w, a in zip(st.weights, st.activations)]
    capacity = min(max(0, int(r // (k * ctx))) for r, k in zip(room, st.kv_per_token))
    seqs_r = math.ceil(req.batch / dp) if req.batch else 1
    need_tokens = max(seqs_r * ctx, max_len)
    kv = [k * need_tokens for k in st.kv_per_token]
    worst = min(range(pp), key=lambda s: room[s] - kv[s])
    memory = MemoryPerDevice(int(st.weights[worst]), int(kv[worst]), int(st.activations[worst]),
                             RUNTIME_OVERHEAD_BYTES, int(room[worst] - kv[worst]))
    fits = memory.free >= 0
    layout = Layout(tp, pp, dp, ep, fits, memory, capacity * dp if fits else 0)
    if not fits:
        short = -memory.free / GiB
        what = f"{req.batch} sequences of {ctx} tokens" if req.batch else f"one {max_len}-token sequence"
        layout.notes.append(f"short by {short:.1f} GiB per device for weights plus {what}")
        return layout
    if with_perf:
        _predict(layout, cost, req, capacity)
    return layout


def _replica_throughput(cost: LayoutCost, seqs: int, req: Request, prefill_busy: float) -> tuple[float, float]:
    """(output tok/s of one replica running `seqs` sequences, per-sequence decode tok/s).

    In `osl` decode steps the replica emits seqs * osl tokens and must also prefill `seqs` new prompts,
    each occupying the bottleneck stage for `prefill_busy` seconds.
    """
    tpot = cost.decode_step_s(seqs, req.isl + req.osl / 2)
    return seqs * req.osl / (req.osl * tpot + seqs * prefill_busy), 1.0 / tpot


def _predict(layout: Layout, cost: LayoutCost, req: Request, capacity: int) -> None:
    layout.prefill_latency_s = cost.prefill_s(req.isl, req.chunk_tokens)
    prefill_busy = _batched_prefill_s(cost, req) if req.batch != 1 else layout.prefill_latency_s
    dp = layout.dp
    if req.objective == "rate":
        need = req.rate * req.osl / dp  # output tok/s each replica must sustain
        cap = max(1, min(capacity, req.max_num_seqs))
        lo, hi = 1, cap
        while lo < hi:  # smallest concurrency whose throughput meets the load
            mid = (lo + hi) // 2
            if _replica_throughput(cost, mid, req, prefill_busy)[0] >= need:
                hi = mid
            else:
                lo = mid + 1
        tput, speed = _replica_throughput(cost, lo, req, prefill_busy)
        layout.sustains_rate = tput >= need
        layout.batch, layout.decode_tok_s_per_seq = lo * dp, speed
        layout.throughput_tok_s = min(tput, need) * dp
        if not layout.sustains_rate:
            layout.notes.append(f"saturates at {tput * dp:.0f} tok/s, below the {need * dp:.0f} tok/s asked")
        return
    if req.batch:
        base, extra = divmod(req.batch, dp)  # `extra` replicas run base + 1 sequences
        total = 0.0
        for seqs, count in ((base + 1, extra), (base, dp - extra)):
            if seqs and count:
                total += count * _replica_throughput(cost, seqs, req, prefill_busy)[0]
        busiest = base + (1 if extra else 0)  # its sequences decode slowest
        layout.decode_tok_s_per_seq = _replica_throughput(cost, busiest, req, prefill_busy)[1]
        layout.batch, layout.throughput_tok_s = req.batch, total
        return
    seqs = min(capacity, req.max_num_seqs)
    tput, speed = _replica_throughput(cost, seqs, req, prefill_busy)
    layout.batch, layout.throughput_tok_s, layout.decode_tok_s_per_seq = seqs * dp, tput * dp, speed


def _batched_prefill_s(cost: LayoutCost, req: Request) -> float:
    """Seconds of the busiest stage spent per prompt when prompts are prefilled together in full chunks.

    Under load the engine packs several prompts into one chunk of `chunk_tokens`, so weights are read
    and collectives launched once per chunk, not once per prompt.
    """
    chunk = max(req.isl, min(req.chunk_tokens, req.isl * req.max_num_seqs))
    prompts = chunk / req.isl
    per_chunk = max(cost.stage_time(s, chunk, chunk * req.isl / 2, math.ceil(prompts), 0) for s in range(cost.pp))
    return per_chunk / prompts


def rank_key(layout: Layout, req: Request) -> tuple:
    """Sort key, best first (negated so that ascending order puts the best layout first)."""
    speed, tput = layout.decode_tok_s_per_seq or 0.0, layout.throughput_tok_s or 0.0
    simpler = (layout.pp, layout.ep, layout.tp)  # on ties: fewer stages, fewer expert groups, less TP
    if req.objective == "latency":
        return (not layout.fits, -round(speed, 6), -round(tput, 6), *simpler)
    if req.objective == "rate":
        return (not layout.fits, not layout.sustains_rate, -round(speed if layout.sustains_rate else tput, 6), *simpler)
    return (not layout.fits, -round(tput, 6), -round(speed, 6), *simpler)


def search(spec: ModelSpec, cluster: Cluster, req: Request,
           engine_only: bool = False) -> tuple[list[Layout], list[tuple[Shape, str]]]:
    """All candidate layouts, best first, and the shapes excluded with their reasons (`engine_only`: only layouts
    this engine runs)."""
    shapes, excluded = enumerate_shapes(spec, cluster, engine_only)
    layouts = [evaluate(spec, cluster, shape, req) for shape in shapes]
    layouts.sort(key=lambda lay: rank_key(lay, req))
    return layouts, excluded


def smallest_fitting_cluster(spec: ModelSpec, cluster: Cluster, req: Request, max_nodes: int = 64,
                             engine_only: bool = False) -> tuple[Cluster, Layout] | None:
    """The fewest GPUs of this kind on which some layout fits, and that layout.

    A single-node cluster may grow to 8 GPUs per node (a typical server) before adding nodes; a
    multi-node cluster keeps its node size. Past one node, clusters grow by whole nodes. With `engine_only`,
    only one node and only layouts this engine runs.
    """
    if engine_only:
        max_nodes = 1
    gpn = cluster.gpus_per_node if cluster.nodes > 1 else max(cluster.gpus_per_node, 8)
    sizes = [(n, 1) for n in range(1, gpn + 1)] + [(gpn, nodes) for nodes in range(2, max_nodes + 1)]
    for per_node, nodes in sizes:
        candidate = cluster.with_size(per_node, nodes)
        shapes, _ = enumerate_shapes(spec, candidate, engine_only)
        fitting = [lay for lay in (evaluate(spec, candidate, s, req, with_perf=False) for s in shapes) if lay.fits]
        if fitting:
            return candidate, min(fitting, key=lambda lay: (lay.pp, -lay.tp, lay.ep))
    return None
