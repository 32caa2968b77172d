"""Planning for the GPUs of this machine: what `shardserve serve --plan auto` calls."""

from __future__ import annotations

import dataclasses
import re

from shardserve.planner.hardware import GB, TFLOPS, Cluster, GPUSpec, PlannerError, get_gpu
from shardserve.planner.memory import ModelSpec
from shardserve.planner.recommend import make_plan
from shardserve.planner.search import Layout, Request
from shardserve.planner.topology import Topology, detect_topology, order_for_tp

# torch.cuda.get_device_name() patterns -> preset, first match wins.
_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"h100.*pcie", "H100-PCIe"), (r"h100", "H100-SXM"), (r"h200", "H200"), (r"b200", "B200"),
    (r"a100.*40\s*gb", "A100-40GB"), (r"a100", "A100-80GB"), (r"l40s", "L40S"), (r"\bl4\b", "L4"),
    (r"4090", "RTX-4090"),
]


def gpu_spec_for_device(name: str, total_memory: int) -> GPUSpec:
    """The preset matching a CUDA device name, with its real memory size; a conservative generic spec otherwise."""
    for pattern, preset in _NAME_PATTERNS:
        if re.search(pattern, name, re.IGNORECASE):
            return dataclasses.replace(get_gpu(preset), memory_bytes=total_memory)
    return GPUSpec(name=name, memory_bytes=total_memory, memory_bandwidth=1000 * GB, bf16_flops=100 * TFLOPS,
                   fp8_flops=None, int8_ops=None, nvlink_bandwidth=0.0, nvlink_group=0, pcie_bandwidth=32 * GB,
                   network_bandwidth=12.5 * GB, source="unknown device: generic estimates")


def local_cluster(topology: Topology | None = None) -> tuple[Cluster, Topology] | None:
    """A single-node Cluster of the visible CUDA GPUs (None without CUDA), using the NVLink topology."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    count = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    gpu = gpu_spec_for_device(props.name, props.total_memory)
    topo = topology if topology is not None else detect_topology()
    if topo.known and topo.num_gpus >= count:
        clique = topo.largest_nvlink_clique()
        nvlink = clique > 1 and gpu.nvlink_bandwidth > 0
        gpu = dataclasses.replace(gpu, nvlink_group=clique if nvlink else 0)
        interconnect = "nvlink" if nvlink else "pcie"
    else:
        interconnect = "nvlink" if gpu.nvlink_bandwidth > 0 and gpu.nvlink_group >= count else "pcie"
    return Cluster(gpu=gpu, gpus_per_node=count, nodes=1, interconnect=interconnect), topo


def recommend_for_local_gpus(model_config: dict, *, dtype: str = "bf16", kv_dtype: str | None = None,
                             max_model_len: int | None = None, batch: int | None = None,
                             rate: float | None = None, isl: int = 1024, osl: int = 256,
                             topology: Topology | None = None) -> Layout | None:
    """The recommended layout for `model_config` (an HF config dict) on this machine's CUDA GPUs.

    Returns None when there are no CUDA GPUs. The layout's `device_order` lists the physical GPUs
    rank by rank, so that each TP group sits on NVLink neighbours. Raises PlannerError (with the
    smallest cluster that would fit) when no layout fits.
    """
    found = local_cluster(topology)
    if found is None:
        return None
    cluster, topo = found
    spec = ModelSpec.from_config(model_config, model_config.get("_name_or_path"))
    req = Request(dtype=dtype, kv_dtype=kv_dtype or ("fp16" if dtype == "fp16" else "bf16"),
                  max_model_len=max_model_len, batch=batch, rate=rate, isl=isl, osl=osl)
    plan = make_plan(spec, cluster, req)
    if plan.recommended is None:
        raise PlannerError(plan.message or "no layout fits")
    layout = plan.recommended
    layout.notes.extend(plan.reasons)
    layout.device_order = order_for_tp(topo, layout.tp, list(range(cluster.num_gpus)))
    return layout


def apply_auto_plan(eargs, hf_config: dict, environ: dict | None = None) -> list[str]:
    """`serve --plan auto`: set tp/pp/dp/ep on EngineArgs from the recommendation for this machine's GPUs and
    order the GPUs so TP groups are NVLink neighbours (CUDA_VISIBLE_DEVICES). Returns lines to tell the user;
    without CUDA GPUs the layout flags stay as given."""
    import os
    environ = os.environ if environ is None else environ
    dtype = {"float16": "fp16"}.get(eargs.dtype, "bf16")
    layout = recommend_for_local_gpus(hf_config, dtype=dtype, max_model_len=eargs.max_model_len)
    if layout is None:
        return [f"--plan auto: no CUDA GPUs found; keeping tp={eargs.tensor_parallel_size}, "
                f"pp={eargs.pipeline_parallel_size}, dp={eargs.data_parallel_size}"]
    eargs.tensor_parallel_size, eargs.pipeline_parallel_size = layout.tp, layout.pp
    eargs.data_parallel_size = layout.dp
    eargs.enable_expert_parallel = layout.ep > 1
    if layout.device_order:
        environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, layout.device_order))
    return [f"--plan auto: {layout.label()}"] + [f"  - {n}" for n in layout.notes]
