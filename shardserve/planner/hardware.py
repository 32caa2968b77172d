"""GPU hardware presets, user hardware files, and parsing of `--gpus COUNTxNAME` into a Cluster.

Every number below is a vendor datasheet figure (dense, i.e. without 2:4 sparsity). Sources:

- H100 SXM5 / H100 PCIe: NVIDIA H100 Tensor Core GPU datasheet (2023): 80 GB; 3.35 TB/s (SXM),
  2.0 TB/s (PCIe); BF16 989.4 / 756.5 TFLOPS; FP8 1,978.9 / 1,513 TFLOPS; NVLink 900 GB/s (SXM,
  via NVSwitch), 600 GB/s NVLink bridge (PCIe, pairs only); PCIe Gen5 128 GB/s.
- H200 SXM: NVIDIA H200 datasheet (2024): 141 GB HBM3e, 4.8 TB/s; compute as H100 SXM; NVLink 900 GB/s.
- B200: NVIDIA DGX B200 datasheet (2024): 1,440 GB and 64 TB/s HBM3e for 8 GPUs (180 GB, 8 TB/s each);
  72 PFLOPS FP8 training (sparse) for 8 GPUs = 4.5 PFLOPS dense FP8, 2.25 PFLOPS dense BF16 per GPU;
  NVLink 5 1.8 TB/s per GPU.
- A100 80GB / 40GB SXM: NVIDIA A100 datasheet (2021): 2,039 / 1,555 GB/s; BF16 312 TFLOPS; INT8 624 TOPS;
  no FP8; NVLink 600 GB/s; PCIe Gen4 64 GB/s.
- L40S: NVIDIA L40S datasheet (2023): 48 GB GDDR6, 864 GB/s; BF16 362.05 TFLOPS; FP8 733 TFLOPS;
  PCIe Gen4 x16 64 GB/s; no NVLink.
- L4: NVIDIA L4 datasheet (2023): 24 GB GDDR6, 300 GB/s; BF16 121 TFLOPS; FP8 242.5 TFLOPS; PCIe Gen4.
- RTX 4090: NVIDIA Ada Lovelace architecture whitepaper v1.1, appendix table: 24 GB GDDR6X,
  1,008 GB/s; BF16 (FP32 accumulate) 165.2 TFLOPS; FP8 (FP32 accumulate) 330.3 TFLOPS;
  INT8 660.6 TOPS; PCIe Gen4 x16; no NVLink and no peer-to-peer.

Link bandwidths are stored per direction (half the bidirectional datasheet figure). Memory
capacities are the datasheet "GB" read as GiB (HBM stacks are binary-sized); nvidia-smi shows a
little less, which the planner's fixed runtime overhead covers. Network (inter-node) bandwidth per
GPU is the usual DGX/HGX fit: one 400 Gb/s NDR InfiniBand adapter per GPU on H100/H200/B200
(50 GB/s), 200 Gb/s HDR on A100 (25 GB/s), 100 Gb/s Ethernet for PCIe cards (12.5 GB/s).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

GiB = 1024**3
GB = 1e9
TFLOPS = 1e12


class PlannerError(ValueError):
    """Bad planner input (unknown GPU, malformed --gpus, unknown model): shown to the user as is."""


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator: capacity, bandwidth and peak dense throughput."""

    name: str
    memory_bytes: int
    memory_bandwidth: float  # bytes/s (HBM or GDDR)
    bf16_flops: float  # dense FLOP/s
    fp8_flops: float | None  # None: no FP8 tensor cores (FP8 weights are upcast to BF16)
    int8_ops: float | None  # dense INT8 OP/s
    nvlink_bandwidth: float  # bytes/s per direction per GPU; 0 when there is no NVLink
    nvlink_group: int  # GPUs fully connected by NVLink (8 through NVSwitch, 2 for a bridge, 0)
    pcie_bandwidth: float  # bytes/s per direction
    network_bandwidth: float  # inter-node bytes/s per direction per GPU
    source: str = ""

    def flops_for(self, dtype: str) -> float:
        """Peak dense FLOP/s for matmuls with weights of `dtype` (falls back to BF16)."""
        if dtype == "fp8" and self.fp8_flops:
            return self.fp8_flops
        if dtype == "int8" and self.int8_ops:
            return self.int8_ops
        return self.bf16_flops


def _gpu(name: str, mem_gib: float, bw_gbs: float, bf16: float, fp8: float | None, int8: float | None,
         nvlink_gbs: float, nvlink_group: int, pcie_gbs: float, net_gbs: float, source: str) -> GPUSpec:
    return GPUSpec(name=name, memory_bytes=int(mem_gib * GiB), memory_bandwidth=bw_gbs * GB,
                   bf16_flops=bf16 * TFLOPS, fp8_flops=fp8 * TFLOPS if fp8 else None,
                   int8_ops=int8 * TFLOPS if int8 else None, nvlink_bandwidth=nvlink_gbs * GB,
                   nvlink_group=nvlink_group, pcie_bandwidth=pcie_gbs * GB,
                   network_bandwidth=net_gbs * GB, source=source)


GPU_PRESETS: dict[str, GPUSpec] = {
    g.name: g
    for g in [
        _gpu("H100-SXM", 80, 3350, 989.4, 1978.9, 1978.9, 450, 8, 64, 50, "NVIDIA H100 datasheet"),
        _gpu("H100-PCIe", 80, 2000, 756.5, 1513, 1513, 300, 2, 64, 12.5, "NVIDIA H100 datasheet"),
        _gpu("H200", 141, 4800, 989.4, 1978.9, 1978.9, 450, 8, 64, 50, "NVIDIA H200 datasheet"),
        _gpu("B200", 180, 8000, 2250, 4500, 4500, 900, 8, 64, 50, "NVIDIA DGX B200 datasheet"),
        _gpu("A100-80GB", 80, 2039, 312, None, 624, 300, 8, 32, 25, "NVIDIA A100 datasheet"),
        _gpu("A100-40GB", 40, 1555, 312, None, 624, 300, 8, 32, 25, "NVIDIA A100 datasheet"),
        _gpu("L40S", 48, 864, 362.05, 733, 733, 0, 0, 32, 12.5, "NVIDIA L40S datasheet"),
        _gpu("L4", 24, 300, 121, 242.5, 242.5, 0, 0, 32, 12.5, "NVIDIA L4 datasheet"),
        _gpu("RTX-4090", 24, 1008, 165.2, 330.3, 660.6, 0, 0, 32, 12.5,
             "NVIDIA Ada Lovelace architecture whitepaper"),
    ]
}

GPU_ALIASES: dict[str, str] = {
    "h100": "H100-SXM", "h100-sxm5": "H100-SXM", "h100-80gb": "H100-SXM", "h100sxm": "H100-SXM",
    "h100-pcie-80gb": "H100-PCIe", "h100pcie": "H100-PCIe",
    "h200-sxm": "H200", "h200-141gb": "H200",
    "b200-sxm": "B200",
    "a100": "A100-80GB", "a100-80g": "A100-80GB", "a100-sxm-80gb": "A100-80GB", "a100-sxm4-80gb": "A100-80GB",
    "a100-40g": "A100-40GB", "a100-sxm4-40gb": "A100-40GB",
    "4090": "RTX-4090", "rtx4090": "RTX-4090", "geforce-rtx-4090": "RTX-4090",
}

INTERCONNECTS = ("nvlink", "pcie", "ib")


def gpu_names() -> list[str]:
    """Canonical preset names, for error messages and --help."""
    return sorted(GPU_PRESETS)


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def get_gpu(name: str) -> GPUSpec:
    """Look up a preset by name or alias, case-insensitively (H100 = H100-SXM, A100 = A100-80GB)."""
    key = _norm(name)
    for canonical in GPU_PRESETS:
        if _norm(canonical) == key:
            return GPU_PRESETS[canonical]
    if key in GPU_ALIASES:
        return GPU_PRESETS[GPU_ALIASES[key]]
    raise PlannerError(
        f"unknown GPU {name!r}; valid names: {', '.join(gpu_names())} "
        f"(aliases: H100, A100, 4090), or a hardware file such as 4x./myhw.yaml"
    )


_FILE_FIELDS = {  # key in the file -> (GPUSpec field, multiplier)
    "memory_gib": ("memory_bytes", GiB),
    "memory_bandwidth_gbps": ("memory_bandwidth", GB),
    "bf16_tflops": ("bf16_flops", TFLOPS),
    "fp8_tflops": ("fp8_flops", TFLOPS),
    "int8_tops": ("int8_ops", TFLOPS),
    "nvlink_gbps": ("nvlink_bandwidth", GB),
    "nvlink_group": ("nvlink_group", 1),
    "pcie_gbps": ("pcie_bandwidth", GB),
    "network_gbps": ("network_bandwidth", GB),
}
_REQUIRED_FILE_FIELDS = ("name", "memory_gib", "memory_bandwidth_gbps", "bf16_tflops")


def load_hardware_file(path: str | Path) -> GPUSpec:
    """Read a user GPU description from YAML or JSON (schema in docs/planner.md)."""
    path = Path(path)
    if not path.is_file():
        raise PlannerError(f"hardware file {str(path)!r} does not exist")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PlannerError(f"cannot read hardware file {str(path)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise PlannerError(f"hardware file {str(path)!r} must hold a mapping of fields")
    missing = [k for k in _REQUIRED_FILE_FIELDS if k not in data]
    unknown = sorted(set(data) - set(_FILE_FIELDS) - {"name", "source"})
    if missing or unknown:
        raise PlannerError(
            f"hardware file {str(path)!r}: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}; "
            f"fields are name, {', '.join(_FILE_FIELDS)}"
        )
    values: dict[str, object] = {
        "name": str(data["name"]), "fp8_flops": None, "int8_ops": None, "nvlink_bandwidth": 0.0,
        "nvlink_group": 0, "pcie_bandwidth": 32 * GB, "network_bandwidth": 12.5 * GB,
        "source": str(data.get("source", path.name)),
    }
    for key, (field, scale) in _FILE_FIELDS.items():
        if key in data and data[key] is not None:
            try:
                number = float(data[key])
            except (TypeError, ValueError):
                raise PlannerError(f"hardware file {str(path)!r}: {key} must be a number") from None
            if number < 0:
                raise PlannerError(f"hardware file {str(path)!r}: {key} must not be negative")
            values[field] = int(number * scale) if field in ("memory_bytes", "nvlink_group") else number * scale
    if values["nvlink_bandwidth"] and not values["nvlink_group"]:
        values["nvlink_group"] = 8
    return GPUSpec(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Cluster:
    """`nodes` identical machines with `gpus_per_node` GPUs each and one intra-node interconnect."""

    gpu: GPUSpec
    gpus_per_node: int
    nodes: int = 1
    interconnect: str = "nvlink"  # intra-node link: nvlink | pcie | ib (GPUs that only meet over the network)

    @property
    def num_gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def describe(self) -> str:
        nodes = f" x {self.nodes} nodes" if self.nodes > 1 else ""
        return f"{self.gpus_per_node}x{self.gpu.name}{nodes} ({self.interconnect})"

    def with_size(self, gpus_per_node: int, nodes: int) -> "Cluster":
        return dataclasses.replace(self, gpus_per_node=gpus_per_node, nodes=nodes)


def default_interconnect(gpu: GPUSpec) -> str:
    return "nvlink" if gpu.nvlink_bandwidth > 0 and gpu.nvlink_group >= 8 else "pcie"


_GPUS_RE = re.compile(r"^\s*(\d+)\s*[xX*]\s*(\S.*?)\s*$")


def parse_gpus(text: str, nodes: int = 1, interconnect: str | None = None) -> Cluster:
    """Parse `COUNTxNAME` (COUNT GPUs per node; NAME a preset, alias, or a .yaml/.json file)."""
    match = _GPUS_RE.match(text or "")
    if not match:
        raise PlannerError(
            f"malformed --gpus {text!r}: expected COUNTxNAME such as 8xH100 or 4x./myhw.yaml; "
            f"valid names: {', '.join(gpu_names())}"
        )
    count, name = int(match.group(1)), match.group(2)
    if count < 1:
        raise PlannerError(f"--gpus {text!r}: the GPU count must be at least 1")
    if nodes < 1:
        raise PlannerError(f"--nodes must be at least 1, got {nodes}")
    is_file = name.lower().endswith((".yaml", ".yml", ".json")) or "/" in name
    gpu = load_hardware_file(name) if is_file else get_gpu(name)
    link = interconnect or default_interconnect(gpu)
    if link not in INTERCONNECTS:
        raise PlannerError(f"unknown interconnect {link!r}; valid: {', '.join(INTERCONNECTS)}")
    if link == "nvlink" and gpu.nvlink_bandwidth <= 0:
        raise PlannerError(f"{gpu.name} has no NVLink; use --interconnect pcie (or ib)")
    return Cluster(gpu=gpu, gpus_per_node=count, nodes=nodes, interconnect=link)
