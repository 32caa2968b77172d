"""Local GPU topology: parse `nvidia-smi topo -m`, probe peer access, and order devices for TP groups.

Without nvidia-smi (or on a machine without GPUs) everything degrades to an unknown, empty topology;
nothing here raises for a missing driver.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Callable

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GPU = re.compile(r"^GPU(\d+)$")
# Closeness of a PCIe path, best first (nvidia-smi legend); NV# links rank above all of them.
_PCIE_RANK = {"PIX": 5, "PXB": 4, "PHB": 3, "NODE": 2, "SYS": 1, "SOC": 1}


@dataclass
class Topology:
    """How the local GPUs are connected; `links[(i, j)]` is nvidia-smi's code (NV18, PIX, SYS...)."""

    num_gpus: int = 0
    links: dict[tuple[int, int], str] = field(default_factory=dict)
    peer_access: dict[tuple[int, int], bool] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        return self.num_gpus > 0 and bool(self.links or self.num_gpus == 1)

    def nvlinks(self, i: int, j: int) -> int:
        """Number of bonded NVLinks between GPUs i and j (0 when they meet over PCIe or are unknown)."""
        code = self.links.get((i, j), "")
        match = re.fullmatch(r"NV(\d+)", code)
        return int(match.group(1)) if match else 0

    def is_nvlink(self, i: int, j: int) -> bool:
        return self.nvlinks(i, j) > 0

    def closeness(self, i: int, j: int) -> int:
        """Higher is better: NVLink (by link count) above any PCIe path; 0 when unknown."""
        n = self.nvlinks(i, j)
        if n:
            return 100 + n
        code = self.links.get((i, j), "")
        rank = _PCIE_RANK.get(code, 0)
        if not rank and self.peer_access.get((i, j)):
            rank = 1
        return rank

    def nvlink_neighbours(self, i: int) -> list[int]:
        return [j for j in range(self.num_gpus) if j != i and self.is_nvlink(i, j)]

    def fully_nvlinked(self, group: list[int]) -> bool:
        return all(self.is_nvlink(a, b) for a in group for b in group if a != b)

    def largest_nvlink_clique(self) -> int:
        """Size of the largest group of GPUs that all reach each other over NVLink (1 when none)."""
        best = 1 if self.num_gpus else 0
        for size in range(2, self.num_gpus + 1):
            if any(len(g) == size and self.fully_nvlinked(g) for g in group_devices(self, size)):
                best = size
        return best


def parse_topo_matrix(text: str) -> Topology:
    """Parse the matrix printed by `nvidia-smi topo -m` (tab- or space-separated, ANSI codes allowed)."""
    lines = [_ANSI.sub("", line).rstrip() for line in text.splitlines()]
    header: list[int] | None = None
    links: dict[tuple[int, int], str] = {}
    for line in lines:
        cells = line.split()
        if not cells:
            if header is not None and links:
                break  # the legend follows a blank line
            continue
        gpus = [int(m.group(1)) for m in map(_GPU.match, cells) if m]
        if header is None:
            if gpus:  # the first line naming GPUs is the column header
                header = gpus
            continue
        row = _GPU.match(cells[0])
        if not row:
            continue
        i = int(row.group(1))
        for j, code in zip(header, cells[1:1 + len(header)]):
            if i != j and code != "X":
                links[(i, j)] = code
    if header is None:
        return Topology()
    return Topology(num_gpus=len(header), links=links)


def probe_peer_access(num_gpus: int) -> dict[tuple[int, int], bool]:
    """torch.cuda.can_device_access_peer for every ordered pair (empty without CUDA)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return {}
        return {(i, j): bool(torch.cuda.can_device_access_peer(i, j))
                for i in range(num_gpus) for j in range(num_gpus) if i != j}
    except Exception:  # a broken driver must not break planning
        return {}


def detect_topology(run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                    probe_peers: bool = True) -> Topology:
    """Read the local topology; an empty Topology when nvidia-smi is absent or fails."""
    if run is subprocess.run and shutil.which("nvidia-smi") is None:
        return Topology()
    try:
        out = run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return Topology()
    if out.returncode != 0:
        return Topology()
    topo = parse_topo_matrix(out.stdout)
    if probe_peers and topo.num_gpus:
        topo.peer_access = probe_peer_access(topo.num_gpus)
    return topo


def group_devices(topo: Topology, size: int, devices: list[int] | None = None) -> list[list[int]]:
    """Split devices into groups of `size`, greedily keeping each group's worst link as good as possible."""
    remaining = sorted(devices if devices is not None else range(topo.num_gpus))
    groups: list[list[int]] = []
    while len(remaining) >= size:
        group = [remaining.pop(0)]
        while len(group) < size:
            best = max(remaining, key=lambda d: (min(topo.closeness(g, d) for g in group),
                                                 sum(topo.closeness(g, d) for g in group), -d))
            remaining.remove(best)
            group.append(best)
        groups.append(group)
    if remaining:
        groups.append(remaining)
    return groups


def order_for_tp(topo: Topology, tp: int, devices: list[int] | None = None) -> list[int]:
    """Device order such that every consecutive block of `tp` devices is as NVLink-connected as possible.

    Ranks are laid out TP-innermost, so rank r runs on order[r]; unknown topology keeps 0..n-1.
    """
    devices = list(range(topo.num_gpus)) if devices is None else list(devices)
    if tp <= 1 or not topo.known:
        return devices
    return [d for group in group_devices(topo, tp, devices) for d in group]
