"""What shardserve's engine actually runs, for `serve --plan auto` (the `shardserve plan` command also prices what-if
layouts for other engines: multi-node clusters, int8/fp8 weights, expert parallelism across DP replicas).

The engine (engine/args.py, config.py: ParallelConfig, validate_layout) runs:
- one node: every replica and rank is a process on this machine;
- tp x pp ranks per replica and dp independent replicas (separate engine cores with separate process groups);
- expert parallelism only inside a replica's TP group (`--enable-expert-parallel`: ep = tp), never across replicas;
  without it, a MoE model's expert widths must divide by tp;
- weights and KV cache in the model's own 16/32-bit dtype (`--dtype auto|float32|bfloat16|float16`, GGUF files are
  dequantized on load): no int8 or fp8 weights, no separate KV-cache dtype.
"""

from __future__ import annotations

from shardserve.planner.hardware import Cluster
from shardserve.planner.memory import ModelSpec

Shape = tuple[int, int, int, int]  # (tp, pp, dp, ep)

# planner dtype names the engine runs (float32 is run too, but the planner's memory model is 16-bit)
ENGINE_DTYPES = ("bf16", "fp16")
PREFIX = "not run by this engine: "  # starts every reason shape_problem gives
SUMMARY = "single node; tp, pp, dp; ep only = tp within a replica; 16-bit weights and KV cache (no int8/fp8)"


def request_problem(dtype: str, kv_dtype: str) -> str | None:
    """Why the engine cannot run weights of `dtype` with a KV cache of `kv_dtype` (None: it can)."""
    if dtype not in ENGINE_DTYPES:
        return (f"the engine does not run {dtype} weights (it runs {' and '.join(ENGINE_DTYPES)}, or float32; "
                "quantized GGUF weights are dequantized on load)")
    if kv_dtype != dtype:
        return f"the engine keeps the KV cache in the weights' dtype ({dtype}), not {kv_dtype}"
    return None


def shape_problem(spec: ModelSpec, cluster: Cluster, shape: Shape) -> str | None:
    """Why the engine cannot run layout `shape` of `spec` on `cluster`, starting with PREFIX (None: it can)."""
    problem = _shape_problem(spec, cluster, shape)
    return PREFIX + problem if problem else None


def _shape_problem(spec: ModelSpec, cluster: Cluster, shape: Shape) -> str | None:
    tp, pp, dp, ep = shape
    if cluster.nodes > 1:
        return f"the engine runs on one node ({cluster.nodes} nodes given)"
    if ep > 1 and ep != tp:
        return (f"ep={ep} spans {ep // tp} data-parallel replicas; the engine's expert parallelism stays within "
                f"a replica (ep = tp = {tp})")
    if ep > 1 and spec.num_experts % ep:
        return f"{spec.num_experts} experts not divisible by ep={ep}"
    if spec.is_moe and ep == 1 and tp > 1:
        for what, size in (("moe_intermediate_size", spec.moe_intermediate_size),
                           ("shared_expert_intermediate_size", spec.shared_expert_intermediate_size)):
            if size and size % tp:
                return f"tp={tp} without expert parallelism: the experts' {what} ({size}) does not divide by {tp}"
    return None
