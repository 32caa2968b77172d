"""The plan: run the layout search, pick the recommended layout and say why, or say what would fit."""

from __future__ import annotations

from dataclasses import dataclass, field

from shardserve.planner.cost import LayoutCost
from shardserve.planner.hardware import Cluster, GiB, PlannerError
from shardserve.planner.memory import DTYPE_BYTES, ModelSpec, stage_weights, total_params
from shardserve.planner.search import Layout, Request, Shape, rank_key, search, smallest_fitting_cluster

_LINK_NAMES = {"nvlink": "NVLink", "pcie": "PCIe", "ib": "InfiniBand"}


@dataclass
class Plan:
    """Everything `shardserve plan` prints."""

    spec: ModelSpec
    cluster: Cluster
    request: Request
    layouts: list[Layout]
    excluded: list[tuple[Shape, str]]
    recommended: Layout | None = None
    reasons: list[str] = field(default_factory=list)
    smallest_cluster: Cluster | None = None
    smallest_layout: Layout | None = None
    message: str | None = None  # set when nothing fits

    def to_dict(self) -> dict:
        req = self.request
        out: dict = {
            "model": {"name": self.spec.name, "model_type": self.spec.model_type,
                      "params": total_params(self.spec)},
            "cluster": {"gpu": self.cluster.gpu.name, "gpus_per_node": self.cluster.gpus_per_node,
                        "nodes": self.cluster.nodes, "interconnect": self.cluster.interconnect},
            "request": {"objective": req.objective, "dtype": req.dtype, "kv_dtype": req.kv_dtype,
                        "max_model_len": req.context_len(self.spec), "batch": req.batch, "rate": req.rate,
                        "isl": req.isl, "osl": req.osl},
            "layouts": [lay.to_dict() for lay in self.layouts],
            "recommended": None,
        }
        if self.recommended is not None:
            out["recommended"] = {**self.recommended.to_dict(), "reasons": list(self.reasons)}
        else:
            smallest = None
            if self.smallest_cluster is not None and self.smallest_layout is not None:
                c, lay = self.smallest_cluster, self.smallest_layout
                smallest = {"gpus": c.num_gpus, "gpus_per_node": c.gpus_per_node, "nodes": c.nodes,
                            "gpu": c.gpu.name, "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "ep": lay.ep}}
            out["infeasible"] = {"message": self.message, "smallest_cluster": smallest}
        return out


def _compare(a: float, b: float, what: str, other: str) -> str:
    """'2.1x the throughput of tp=8', or 'within 3% of ...' when the two are close."""
    if b <= 0:
        return f"{other} has no {what}"
    ratio = a / b
    if ratio < 1.05:
        return f"{(ratio - 1) * 100:.0f}% ahead of {other} on {what}" if ratio > 1.005 else f"on a par with {other}"
    return f"{ratio:.1f}x the {what} of {other}"


def describe_layout(lay: Layout, spec: ModelSpec, cluster: Cluster, req: Request) -> str:
    """E.g. 'tp=4 within NVLink, dp=2' or 'tp=8 within NVLink, pp=2 across nodes over InfiniBand'."""
    cost = LayoutCost(spec, cluster, lay.tp, lay.pp, lay.dp, lay.ep, req.dtype, req.kv_dtype)
    link = cost.tp_link.name
    parts = [f"tp={lay.tp} {'within' if link == 'nvlink' else 'over'} {_LINK_NAMES[link]}" if lay.tp > 1 else "tp=1"]
    if lay.pp > 1:
        where = "across nodes" if cost.pp_link.name == "ib" and cluster.interconnect != "ib" else "within a node"
        parts.append(f"pp={lay.pp} {where} over {_LINK_NAMES[cost.pp_link.name]}")
    if lay.dp > 1:
        parts.append(f"dp={lay.dp}")
    if lay.ep > 1:
        parts.append(f"ep={lay.ep} ({spec.num_experts // lay.ep} experts per device)")
    return ", ".join(parts)


def _baseline(best: Layout, layouts: list[Layout]) -> Layout | None:
    """The layout to compare with: the widest pure-TP layout, else the runner-up with another shape."""
    fitting = [lay for lay in layouts if lay.fits and lay is not best]
    pure_tp = [lay for lay in fitting if lay.pp == 1 and lay.ep == 1 and lay.dp == 1]
    return pure_tp[0] if pure_tp else (fitting[0] if fitting else None)


def explain(best: Layout, layouts: list[Layout], spec: ModelSpec, cluster: Cluster, req: Request) -> list[str]:
    """Human reasons for the recommendation, most important first."""
    mem = best.memory_per_device
    ctx = req.isl + req.osl
    reasons = [
        f"{describe_layout(best, spec, cluster, req)}: fits with {mem.free / GiB:.1f} GiB per device left for "
        f"KV cache (weights {mem.weights / GiB:.1f} GiB per device), room for {best.max_concurrent_seqs} "
        f"concurrent {ctx}-token sequences"
    ]
    others = [lay for lay in layouts if lay.fits and lay is not best]
    # the runner-up has another (tp, pp, dp): an ep=tp twin of the same shape costs the same
    runner = next((lay for lay in others if lay.shape[:3] != best.shape[:3]), None)
    base = _baseline(best, layouts)
    speed, tput = best.decode_tok_s_per_seq or 0.0, best.throughput_tok_s or 0.0
    if req.objective == "latency":
        line = f"fastest single-sequence decode: {1000 / speed:.1f} ms/token ({speed:.1f} tok/s)"
        if runner:
            line += ", " + _compare(speed, runner.decode_tok_s_per_seq or 0, "speed", f"the runner-up {runner.label()}")
        reasons.append(line)
    elif req.objective == "rate":
        sustaining = sum(1 for lay in layouts if lay.fits and lay.sustains_rate)
        if best.sustains_rate:
            reasons.append(f"sustains {req.rate:g} req/s ({tput:,.0f} output tok/s) with about {best.batch} "
                           f"concurrent sequences at {1000 / speed:.1f} ms/token, the lowest latency of the "
                           f"{sustaining} layouts that sustain it")
        else:
            reasons.append(f"no layout sustains {req.rate:g} req/s; this one comes closest at {tput:,.0f} output "
                           f"tok/s: add GPUs or lower the rate")
    else:
        load = f"at batch {req.batch}" if req.batch else f"with memory filled ({best.batch} sequences)"
        line = f"highest aggregate throughput {load}: {tput:,.0f} tok/s"
        if base:
            line += ", " + _compare(tput, base.throughput_tok_s or 0, "throughput", base.label())
        if runner and runner is not base:
            line += "; " + _compare(tput, runner.throughput_tok_s or 0, "throughput", f"the runner-up {runner.label()}")
        reasons.append(line)
        reasons.append(f"each sequence decodes at {speed:.1f} tok/s ({1000 / speed:.1f} ms/token)")
    if best.pp > 1:
        single = [lay for lay in others if lay.pp == 1]
        if not single:
            reasons.append(f"pp={best.pp} is needed: no single-stage layout fits in {cluster.gpu.name} memory")
        else:
            reasons.append(f"pp={best.pp} beats the best single-stage layout {single[0].label()}")
    if req.context_len(spec) > spec.max_position_embeddings:
        reasons.append(f"warning: max_model_len {req.context_len(spec)} exceeds the model's "
                       f"{spec.max_position_embeddings} positions")
    if best.prefill_latency_s is not None:
        reasons.append(f"time to first token for a {req.isl}-token prompt on an idle replica: "
                       f"{best.prefill_latency_s * 1000:.0f} ms")
    return reasons


def make_plan(spec: ModelSpec, cluster: Cluster, req: Request, engine_only: bool = False) -> Plan:
    """Search every layout; recommend the best fitting one, or find the smallest cluster that fits. With
    `engine_only` (`serve --plan auto`), only layouts this engine runs (planner/engine_support.py): one node, no
    expert parallelism across replicas, 16-bit weights and KV cache."""
    if engine_only:
        from shardserve.planner.engine_support import request_problem
        problem = request_problem(req.dtype, req.kv_dtype)
        if problem:
            raise PlannerError(problem)
    layouts, excluded = search(spec, cluster, req, engine_only)
    plan = Plan(spec, cluster, req, layouts, excluded)
    fitting = [lay for lay in layouts if lay.fits]
    if fitting:
        plan.recommended = min(fitting, key=lambda lay: rank_key(lay, req))
        plan.reasons = explain(plan.recommended, layouts, spec, cluster, req)
        return plan
    weights = stage_weights(spec, range(spec.num_layers), 1, 1, True, True, DTYPE_BYTES[req.dtype]).total
    held = cluster.num_gpus * cluster.gpu.memory_bytes
    what = f"{req.batch} sequences of {req.isl + req.osl} tokens" if req.batch else \
        f"one {req.context_len(spec)}-token sequence"
    plan.message = (f"{spec.name} does not fit on {cluster.num_gpus}x{cluster.gpu.name} in {req.dtype} with {what}: "
                    f"weights alone are about {weights / GiB:.0f} GiB, the cluster holds {held / GiB:.0f} GiB")
    found = smallest_fitting_cluster(spec, cluster, req, engine_only=engine_only)
    if found is None:
        plan.message += ("; no single node of up to 8 such GPUs fits (the engine runs on one node)" if engine_only
                         else "; no cluster of up to 64 such nodes fits")
        return plan
    plan.smallest_cluster, plan.smallest_layout = found
    c, lay = found
    nodes = f" ({c.nodes} nodes of {c.gpus_per_node})" if c.nodes > 1 else ""
    plan.message += f"; the smallest cluster that fits is {c.num_gpus}x{c.gpu.name}{nodes} with {lay.label()}"
    return plan
