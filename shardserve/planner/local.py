"""Planning for the GPUs of this machine: what `shardserve serve --plan auto` calls.

Device indices: torch numbers the GPUs it sees 0..n-1 (the entries of CUDA_VISIBLE_DEVICES, in that list's order,
when it is set); `nvidia-smi` numbers all GPUs in PCI bus order. `apply_auto_plan` sets CUDA_DEVICE_ORDER=PCI_BUS_ID
(when unset, before torch initialises CUDA) so that both orders agree, reads the topology in nvidia-smi's numbering
and restricts it to the visible GPUs in torch's numbering (`visible_topology`), plans in torch's numbering, and maps
the chosen order back through the user's CUDA_VISIBLE_DEVICES entries (`visible_devices_for`), indices or UUIDs."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from typing import Callable, MutableMapping

from shardserve.planner.hardware import GB, TFLOPS, Cluster, GPUSpec, PlannerError, get_gpu
from shardserve.planner.memory import ModelSpec
from shardserve.planner.engine_support import PREFIX as ENGINE_PREFIX, SUMMARY as ENGINE_SUMMARY
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


def visible_entries(environ: MutableMapping[str, str] | None = None) -> list[str] | None:
    """The entries of CUDA_VISIBLE_DEVICES (indices, GPU-/MIG- UUIDs), None when it is unset."""
    env = os.environ if environ is None else environ
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [d.strip() for d in value.split(",") if d.strip()]


def visible_devices_for(order: list[int], entries: list[str] | None) -> str:
    """CUDA_VISIBLE_DEVICES for torch-relative device indices `order`: each index mapped through the user's
    entries (so "3,1,2" with order [0, 1] gives "3,1", UUIDs stay UUIDs); plain indices without one."""
    if entries is None:
        return ",".join(str(i) for i in order)
    if any(i >= len(entries) for i in order):
        raise PlannerError(f"--plan auto: device {max(order)} is not among CUDA_VISIBLE_DEVICES={','.join(entries)}")
    return ",".join(entries[i] for i in order)


def _gpu_uuids(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> dict[str, int]:
    """nvidia-smi's GPU UUID -> index (PCI bus order); empty when nvidia-smi is absent or fails."""
    if run is subprocess.run and shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"], capture_output=True,
                  text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        return {}
    uuids = {}
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            uuids[parts[1]] = int(parts[0])
    return uuids


def visible_topology(topo: Topology, entries: list[str] | None, count: int,
                     uuids: Callable[[], dict[str, int]] = _gpu_uuids) -> Topology:
    """`topo` (nvidia-smi's numbering, PCI bus order) restricted to the `count` GPUs torch sees, renumbered as torch
    numbers them (CUDA_VISIBLE_DEVICES order). Unknown (empty) when an entry cannot be placed (a MIG instance, a
    UUID nvidia-smi does not list, an index beyond the matrix)."""
    if entries is None:
        physical = list(range(count))
    else:
        entries = entries[:count]
        by_uuid = uuids() if any(not e.isdigit() for e in entries) else {}
        physical = []
        for e in entries:
            if e.isdigit():
                physical.append(int(e))
            else:
                match = [i for u, i in by_uuid.items() if u == e or (e.startswith("GPU-") and u.startswith(e))]
                if len(match) != 1:
                    return Topology()
                physical.append(match[0])
    if len(physical) < count or any(p >= topo.num_gpus for p in physical) or not topo.known:
        return Topology()
    links = {(a, b): topo.links[(pa, pb)] for a, pa in enumerate(physical) for b, pb in enumerate(physical)
             if a != b and (pa, pb) in topo.links}
    return Topology(num_gpus=count, links=links)


def local_cluster(topology: Topology | None = None) -> tuple[Cluster, Topology] | None:
    """A single-node Cluster of the visible CUDA GPUs (None without CUDA), using the NVLink topology.

    `topology`, when given, is in torch's numbering; otherwise nvidia-smi's is read and restricted to the visible
    GPUs (`visible_topology`)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    count = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    gpu = gpu_spec_for_device(props.name, props.total_memory)
    if topology is not None:
        topo = topology
    else:
        topo = visible_topology(detect_topology(probe_peers=False), visible_entries(), count)
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
    """The recommended layout for `model_config` (an HF config dict) on this machine's CUDA GPUs, among the
    layouts this engine runs (planner/engine_support.py: one node, tp/pp/dp, ep = tp only, 16-bit).

    Returns None when there are no CUDA GPUs. The layout's `device_order` lists the GPUs rank by rank in
    torch's numbering, so that each TP group sits on NVLink neighbours. Raises PlannerError (with the
    smallest single node that would fit) when no layout fits, or for a dtype the engine does not run.
    """
    found = local_cluster(topology)
    if found is None:
        return None
    cluster, topo = found
    spec = ModelSpec.from_config(model_config, model_config.get("_name_or_path"))
    req = Request(dtype=dtype, kv_dtype=kv_dtype or dtype,
                  max_model_len=max_model_len, batch=batch, rate=rate, isl=isl, osl=osl)
    plan = make_plan(spec, cluster, req, engine_only=True)
    if plan.recommended is None:
        raise PlannerError(plan.message or "no layout fits")
    layout = plan.recommended
    layout.notes.extend(plan.reasons)
    skipped = sum(1 for _, why in plan.excluded if why.startswith(ENGINE_PREFIX))
    layout.notes.append(f"only layouts this engine runs were considered ({ENGINE_SUMMARY})"
                        + (f"; {skipped} other candidate(s) excluded for that" if skipped else ""))
    layout.device_order = order_for_tp(topo, layout.tp, list(range(cluster.num_gpus)))
    return layout


_PLANNER_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _planner_dtype(eargs, hf_config: dict) -> str:
    """The engine's weight dtype in planner terms: --dtype, or the checkpoint's for auto (as config.parse_dtype)."""
    name = eargs.dtype
    if name == "auto":
        name = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32").replace("torch.", "")
    return _PLANNER_DTYPES.get(name, "bf16")


def apply_auto_plan(eargs, hf_config: dict, environ: MutableMapping[str, str] | None = None) -> list[str]:
    """`serve --plan auto`: set tp/pp/dp/ep on EngineArgs from the recommendation for this machine's GPUs, among
    the layouts this engine runs, and order the GPUs so TP groups are NVLink neighbours (CUDA_VISIBLE_DEVICES,
    mapped through the user's own CUDA_VISIBLE_DEVICES). Returns lines to tell the user; without CUDA GPUs, or for
    weights the planner does not size (float32), the layout flags stay as given."""
    environ = os.environ if environ is None else environ
    keep = (f"keeping tp={eargs.tensor_parallel_size}, pp={eargs.pipeline_parallel_size}, "
            f"dp={eargs.data_parallel_size}")
    lines: list[str] = []
    if "CUDA_DEVICE_ORDER" not in environ:
        environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # torch then numbers GPUs as nvidia-smi does
        if environ is os.environ and _cuda_initialized():
            lines.append("--plan auto: CUDA was initialised before CUDA_DEVICE_ORDER=PCI_BUS_ID could be set; "
                         "set it yourself so device numbers follow the PCI bus order")
    found = local_cluster()
    if found is None:
        return lines + [f"--plan auto: no CUDA GPUs found; {keep}"]
    dtype = _planner_dtype(eargs, hf_config)
    if dtype == "fp32":
        return lines + [f"--plan auto: the planner sizes 16-bit weights only and this model runs in float32; {keep} "
                        "(pass --dtype bfloat16 or float16 to plan)"]
    entries = visible_entries(environ)
    layout = recommend_for_local_gpus(hf_config, dtype=dtype, max_model_len=eargs.max_model_len, topology=found[1])
    assert layout is not None
    eargs.tensor_parallel_size, eargs.pipeline_parallel_size = layout.tp, layout.pp
    eargs.data_parallel_size = layout.dp
    eargs.enable_expert_parallel = layout.ep > 1  # engine_only: ep is 1 or tp
    if layout.device_order:
        environ["CUDA_VISIBLE_DEVICES"] = visible_devices_for(layout.device_order, entries)
    lines.append(f"--plan auto: {layout.label()}")
    if layout.device_order:
        lines.append(f"  - CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']} (rank order; "
                     f"CUDA_DEVICE_ORDER={environ.get('CUDA_DEVICE_ORDER')})")
    return lines + [f"  - {n}" for n in layout.notes]


def _cuda_initialized() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_initialized())
    except ImportError:
        return False
