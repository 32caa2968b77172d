"""Planner topology: `nvidia-smi topo -m` parsing, TP group ordering, local-GPU recommendation."""

from __future__ import annotations

import subprocess
import types

import pytest

from shardserve.planner.model_presets import get_model_preset
from shardserve.planner.topology import Topology, detect_topology, group_devices, order_for_tp, parse_topo_matrix

# Captured from a DGX H100 (tab-separated, NIC columns, empty cells, the legend after a blank line).
DGX_H100 = """\
\tGPU0\tGPU1\tGPU2\tGPU3\tGPU4\tGPU5\tGPU6\tGPU7\tNIC0\tNIC1\tNIC2\tNIC3\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\tPIX\tNODE\tSYS\tSYS\t0-55,112-167\t0\t\tN/A
GPU1\tNV18\t X \tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\tNODE\tPIX\tSYS\tSYS\t0-55,112-167\t0\t\tN/A
GPU2\tNV18\tNV18\t X \tNV18\tNV18\tNV18\tNV18\tNV18\tNODE\tNODE\tSYS\tSYS\t0-55,112-167\t0\t\tN/A
GPU3\tNV18\tNV18\tNV18\t X \tNV18\tNV18\tNV18\tNV18\tNODE\tNODE\tSYS\tSYS\t0-55,112-167\t0\t\tN/A
GPU4\tNV18\tNV18\tNV18\tNV18\t X \tNV18\tNV18\tNV18\tSYS\tSYS\tPIX\tNODE\t56-111,168-223\t1\t\tN/A
GPU5\tNV18\tNV18\tNV18\tNV18\tNV18\t X \tNV18\tNV18\tSYS\tSYS\tNODE\tPIX\t56-111,168-223\t1\t\tN/A
GPU6\tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\t X \tNV18\tSYS\tSYS\tNODE\tNODE\t56-111,168-223\t1\t\tN/A
GPU7\tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\t X \tSYS\tSYS\tNODE\tNODE\t56-111,168-223\t1\t\tN/A
NIC0\tPIX\tNODE\tNODE\tNODE\tSYS\tSYS\tSYS\tSYS\t X \tNODE\tSYS\tSYS
NIC1\tNODE\tPIX\tNODE\tNODE\tSYS\tSYS\tSYS\tSYS\tNODE\t X \tSYS\tSYS
NIC2\tSYS\tSYS\tSYS\tSYS\tPIX\tNODE\tNODE\tNODE\tSYS\tSYS\t X \tNODE
NIC3\tSYS\tSYS\tSYS\tSYS\tNODE\tPIX\tNODE\tNODE\tSYS\tSYS\tNODE\t X 

Legend:

  X    = Self
  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)
  NODE = Connection traversing PCIe as well as the interconnect between PCIe Host Bridges within a NUMA node
  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)
  PXB  = Connection traversing multiple PCIe bridges (without traversing the PCIe Host Bridge)
  PIX  = Connection traversing at most a single PCIe bridge
  NV#  = Connection traversing a bonded set of # NVLinks

NIC Legend:

  NIC0: mlx5_0
  NIC1: mlx5_1
  NIC2: mlx5_2
  NIC3: mlx5_3
"""

# A PCIe workstation with NVLink bridges joining GPU0-GPU2 and GPU1-GPU3 (older, space-aligned
# output with the underline escape code nvidia-smi prints on a terminal).
BRIDGED_PAIRS = """\
\x1b[4m        GPU0    GPU1    GPU2    GPU3    CPU Affinity    NUMA Affinity\x1b[0m
GPU0     X      PHB     NV4     SYS     0-15            0
GPU1    PHB      X      SYS     NV4     0-15            0
GPU2    NV4     SYS      X      PHB     16-31           1
GPU3    SYS     NV4     PHB      X      16-31           1

Legend:

  X    = Self
  NV#  = Connection traversing a bonded set of # NVLinks
"""


def test_parse_dgx_h100() -> None:
    topo = parse_topo_matrix(DGX_H100)
    assert topo.known and topo.num_gpus == 8
    assert topo.nvlinks(0, 7) == 18 and topo.is_nvlink(3, 4)
    assert topo.nvlink_neighbours(0) == [1, 2, 3, 4, 5, 6, 7]
    assert topo.fully_nvlinked(list(range(8))) and topo.largest_nvlink_clique() == 8
    assert (0, 0) not in topo.links and len(topo.links) == 56  # NIC columns and rows ignored
    assert order_for_tp(topo, 4) == list(range(8))


def test_parse_bridged_pairs_and_order_tp_groups_on_nvlink_neighbours() -> None:
    topo = parse_topo_matrix(BRIDGED_PAIRS)
    assert topo.num_gpus == 4
    assert topo.nvlink_neighbours(0) == [2] and topo.nvlink_neighbours(1) == [3]
    assert topo.links[(0, 1)] == "PHB" and topo.links[(0, 3)] == "SYS"
    assert topo.largest_nvlink_clique() == 2
    assert order_for_tp(topo, 2) == [0, 2, 1, 3]
    assert group_devices(topo, 2) == [[0, 2], [1, 3]]
    assert order_for_tp(topo, 4) == [0, 2, 1, 3]  # still keeps NVLink pairs adjacent
    assert order_for_tp(topo, 1) == [0, 1, 2, 3]


def test_pcie_closeness_orders_groups_without_nvlink() -> None:
    text = "\tGPU0\tGPU1\tGPU2\tGPU3\nGPU0\t X \tSYS\tSYS\tPIX\nGPU1\tSYS\t X \tPIX\tSYS\n" \
           "GPU2\tSYS\tPIX\t X \tSYS\nGPU3\tPIX\tSYS\tSYS\t X \n"
    topo = parse_topo_matrix(text)
    assert not topo.is_nvlink(0, 3) and topo.closeness(0, 3) > topo.closeness(0, 1)
    assert order_for_tp(topo, 2) == [0, 3, 1, 2]


def test_single_gpu_and_garbage() -> None:
    one = parse_topo_matrix("\tGPU0\tNIC0\tCPU Affinity\tNUMA Affinity\nGPU0\t X \tPIX\t0-15\t0\n")
    assert one.num_gpus == 1 and one.known and one.links == {}
    assert parse_topo_matrix("") == Topology()
    assert not parse_topo_matrix("NVIDIA-SMI has failed because it couldn't communicate").known


def test_detect_topology_without_nvidia_smi_is_unknown() -> None:
    def missing(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    def failing(*args, **kwargs):
        return subprocess.CompletedProcess(args, 9, stdout="", stderr="driver not loaded")

    def timing_out(*args, **kwargs):
        raise subprocess.TimeoutExpired("nvidia-smi", 20)

    for run in (missing, failing, timing_out):
        topo = detect_topology(run=run)
        assert not topo.known and topo.num_gpus == 0
        assert order_for_tp(topo, 4, [0, 1, 2, 3]) == [0, 1, 2, 3]
    assert detect_topology().num_gpus >= 0  # the real machine: never raises


def test_detect_topology_parses_runner_output() -> None:
    def fake(*args, **kwargs):
        return subprocess.CompletedProcess(args, 0, stdout=DGX_H100, stderr="")

    assert detect_topology(run=fake, probe_peers=False).num_gpus == 8


def test_recommend_for_local_gpus_is_none_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from shardserve.planner.local import recommend_for_local_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert recommend_for_local_gpus(get_model_preset("Qwen3-0.6B")) is None


def fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int, name: str, memory: int) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name=name, total_memory=memory))


def test_recommend_for_local_gpus_on_a_dgx(monkeypatch: pytest.MonkeyPatch) -> None:
    from shardserve.planner.local import recommend_for_local_gpus

    fake_cuda(monkeypatch, 8, "NVIDIA H100 80GB HBM3", 81559 * 2**20)
    layout = recommend_for_local_gpus(get_model_preset("Llama-3.1-70B"), batch=1,
                                      topology=parse_topo_matrix(DGX_H100))
    assert layout is not None and (layout.tp, layout.pp, layout.dp) == (8, 1, 1)
    assert layout.device_order == list(range(8)) and layout.notes


def test_recommend_for_local_gpus_keeps_tp_on_nvlink_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    from shardserve.planner.local import local_cluster, recommend_for_local_gpus

    fake_cuda(monkeypatch, 4, "NVIDIA H100 PCIe", 81559 * 2**20)
    topo = parse_topo_matrix(BRIDGED_PAIRS)
    cluster, _ = local_cluster(topo)
    assert cluster.gpu.name == "H100-PCIe" and cluster.interconnect == "nvlink" and cluster.gpu.nvlink_group == 2
    from shardserve.planner.cost import LayoutCost
    from shardserve.planner.memory import ModelSpec

    spec = ModelSpec.from_config(get_model_preset("Llama-3.1-8B"))
    assert LayoutCost(spec, cluster, 2, 1, 2, 1).tp_link.name == "nvlink"  # within a bridged pair
    assert LayoutCost(spec, cluster, 4, 1, 1, 1).tp_link.name == "pcie"
    layout = recommend_for_local_gpus(get_model_preset("Llama-3.1-8B"), batch=1, topology=topo)
    assert layout is not None and layout.tp == 4
    assert layout.device_order == [0, 2, 1, 3]  # ranks 0,1 and 2,3 sit on NVLink pairs


def test_recommend_for_local_gpus_raises_clearly_when_nothing_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    from shardserve.planner.hardware import PlannerError
    from shardserve.planner.local import recommend_for_local_gpus

    fake_cuda(monkeypatch, 1, "NVIDIA GeForce RTX 4090", 24 * 2**30)
    with pytest.raises(PlannerError, match="smallest cluster that fits"):
        recommend_for_local_gpus(get_model_preset("Llama-3.1-70B"), topology=Topology())
