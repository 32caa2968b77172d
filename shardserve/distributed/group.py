"""GroupCoordinator: one process group seen from this rank, with every collective it offers, the fastest
implementation picked per call, and optional timing of every call.

Each group has a device group (NCCL on GPU, gloo on CPU) for tensors and a CPU gloo companion (`cpu_group`) for
metadata and objects; with gloo they are the same group. A group of one rank does every operation as the identity
and never touches torch.distributed.

Fast paths. On GPUs, `init_custom_allreduce()` (called by build_parallel_state for the tp group; ep shares it when
its ranks are the same) maps every rank's buffer over CUDA IPC where the GPUs have NVLink peer access, and all_reduce
of CUDA tensors up to its size limit then runs as one Triton kernel (`custom_allreduce.py`, impl "custom") instead
of NCCL. On CPUs, all_reduce, all_gather and reduce_scatter of CPU tensors go through a shared-memory segment per
group (`shm_allreduce.py`) instead of gloo, chosen per call by `allreduce_mode` (constructor `allreduce=`, else
$SHARDSERVE_ALLREDUCE; the same on every rank): `auto` (default) uses shm up to `shm_max_bytes` per rank, `shm`
for every size (chunked), `gloo` never. Device tensors and unsupported dtypes always use the process group. With
$SHARDSERVE_COMM_TIMING=1 (or `enable_collective_timing()`) every call of a group of 2+ ranks adds its wall time
to `collective_stats()`, keyed by group, op and implementation.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from shardserve.distributed import codec
from shardserve.distributed.custom_allreduce import CustomAllReduce
from shardserve.distributed.shm_allreduce import ShmCommunicator, shm_applies

__all__ = ["GroupCoordinator", "PendingSend", "collective_stats", "enable_collective_timing", "set_default_timeout",
           "wait_all"]

# Newer torch renames the tensor-in/tensor-out collectives; take whichever this torch has.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_timeout_s: float | None = None  # from init_distributed (set_default_timeout); applies to every group built afterwards
ALLREDUCE_MODES = ("auto", "gloo", "shm")
OVERLAP_MIN_ROWS = 128  # overlapped row-parallel layers: no chunk of fewer rows (small GEMMs lose more than they hide)
SHM_AUTO_MAX_BYTES = 64 << 20  # `auto`: shm up to this many bytes per rank (faster at every size measured)
_timing = os.environ.get("SHARDSERVE_COMM_TIMING", "0") not in ("", "0")
_comm_stats: dict[str, list] = {}  # "{group}_{op}_{impl}" -> [seconds, calls]


def enable_collective_timing(on: bool = True) -> None:
    """Start (or stop) adding every collective's wall time to `collective_stats()` in this process."""
    global _timing
    _timing = on


def collective_stats(reset: bool = False) -> dict[str, float]:
    """Cumulative collective time of this process: comm_s, comm_calls and comm_{group}_{op}_{impl}_s /
    _calls (e.g. comm_tp_all_reduce_shm_s). Empty while timing is off; `reset` zeroes the counters."""
    out: dict[str, float] = {"comm_s": 0.0, "comm_calls": 0} if _timing else {}
    for key, (secs, calls) in _comm_stats.items():
        out[f"comm_{key}_s"], out[f"comm_{key}_calls"] = secs, calls
        out["comm_s"] = out.get("comm_s", 0.0) + secs
        out["comm_calls"] = out.get("comm_calls", 0) + calls
    if reset:
        _comm_stats.clear()
    return out


def _timed(op: str):
    """Decorator: with timing on, add the wall time of a group-of-2+ call to `_comm_stats`."""
    def wrap(fn):
        @functools.wraps(fn)
        def timed(self: "GroupCoordinator", *args: Any, **kwargs: Any) -> Any:
            if not _timing or self.world_size == 1:
                return fn(self, *args, **kwargs)
            self.last_impl = self.backend
            t0 = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                entry = _comm_stats.setdefault(f"{self.name}_{op}_{self.last_impl}", [0.0, 0])
                entry[0] += time.perf_counter() - t0
                entry[1] += 1
        return timed
    return wrap


def set_default_timeout(timeout_s: float | None) -> None:
    """The timeout every group built from now on uses (set by parallel_state.init_distributed)."""
    global _timeout_s
    _timeout_s = timeout_s


def default_timeout() -> float | None:
    return _timeout_s


class PendingSend:
    """A non-blocking send or all-reduce in flight; keeps its buffer alive until `wait()`. With `stat_key` (timing
    on), the time `wait()` blocks is added to that collective's time (not its call count)."""

    def __init__(self, work: Any, tensor: torch.Tensor, stat_key: str | None = None):
        self._work, self._tensor, self._stat_key = work, tensor, stat_key

    def wait(self) -> None:
        if self._work is not None:
            t0 = time.perf_counter()
            self._work.wait()
            if self._stat_key is not None:
                _comm_stats.setdefault(self._stat_key, [0.0, 0])[0] += time.perf_counter() - t0
        self._work = self._tensor = None

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()


def wait_all(handles: list[PendingSend]) -> None:
    """Wait for every handle returned by `GroupCoordinator.isend_tensor_dict`."""
    for h in handles:
        h.wait()


def _bytes_of(t: torch.Tensor) -> bytes:
    """The raw bytes of a contiguous CPU uint8 tensor."""
    return ctypes.string_at(t.data_ptr(), t.numel()) if t.numel() else b""


class GroupCoordinator:
    """One process group (tp, pp, dp, ep, world) seen from this rank."""

    def __init__(self, name: str, ranks: list[int], rank: int, device_group: Any = None,
                 cpu_group: Any = None, device: torch.device | None = None, allreduce: str | None = None,
                 timeout_s: float | None = None):
        self.name = name
        self.ranks = list(ranks)  # global ranks, ordered by rank in group
        self.rank = rank  # this process's global rank
        self.world_size = len(self.ranks)
        self.rank_in_group = self.ranks.index(rank)
        self.device = device or torch.device("cpu")
        if self.world_size > 1 and (device_group is None or cpu_group is None):
            raise ValueError(f"group {name} of {self.world_size} ranks needs process groups")
        self.device_group = device_group  # tensors (NCCL on GPU)
        self.cpu_group = cpu_group  # metadata and objects (always gloo)
        mode = (allreduce or os.environ.get("SHARDSERVE_ALLREDUCE") or "auto").strip().lower()
        if mode not in ALLREDUCE_MODES:
            raise ValueError(f"allreduce mode {mode!r} (SHARDSERVE_ALLREDUCE) is not one of {ALLREDUCE_MODES}")
        self.allreduce_mode = mode  # per call: shm or the process group, see the module docstring
        self.shm_max_bytes = SHM_AUTO_MAX_BYTES
        self.timeout_s = timeout_s if timeout_s is not None else (_timeout_s or 60.0)  # shm waits
        self.backend = str(dist.get_backend(device_group)) if self.world_size > 1 else "none"  # gloo | nccl
        self.last_impl = self.backend  # what the last all_reduce / all_gather / reduce_scatter used
        self._shm: ShmCommunicator | None = None
        self._shm_tried = False
        self.custom: CustomAllReduce | None = None  # GPU one-shot all-reduce, see init_custom_allreduce
        self.overlap_chunks = 1  # row-parallel layers split their GEMM + all-reduce in up to this many pieces

    def overlap_chunks_for(self, rows: int) -> int:
        """Pieces a row-parallel layer of `rows` tokens splits into so that each piece's all-reduce runs while the
        next piece computes (1 = no split): at most `overlap_chunks`, at least OVERLAP_MIN_ROWS rows each."""
        if self.overlap_chunks < 2 or self.world_size == 1:
            return 1
        return max(1, min(self.overlap_chunks, rows // OVERLAP_MIN_ROWS))

    def init_custom_allreduce(self, enabled: bool = True) -> bool:
        """Collective over the group: set up the GPU custom all-reduce where it can work (CUDA group of 2..8 ranks
        on one host with peer access, triton on every rank, `enabled`); returns whether it is on. CPU groups and
        groups of one rank skip it without communicating."""
        if self.world_size > 1 and self.device.type == "cuda":  # same test as CudaIpc.applies: no collective
            self.custom = CustomAllReduce.create(self, enabled=enabled)
        return self.custom is not None

    def _shm_for(self, t: torch.Tensor, reduce: bool) -> ShmCommunicator | None:
        """The shared-memory path for this call, or None for the process group (same answer on every rank).

        The first call that qualifies sets the segment up (a collective over cpu_group)."""
        self.last_impl = self.backend
        if not shm_applies(self.allreduce_mode, t, reduce, self.shm_max_bytes):
            return None
        if not self._shm_tried:
            self._shm_tried, self._shm = True, ShmCommunicator.create(self)
        self.last_impl = "shm" if self._shm is not None else self.backend
        return self._shm

    def close(self) -> None:
        """Release this group's shared-memory segment (the process groups belong to torch.distributed)."""
        if self._shm is not None:
            self._shm.close()
        self.custom = None

    def __repr__(self) -> str:
        return f"GroupCoordinator({self.name}, ranks={self.ranks}, rank_in_group={self.rank_in_group})"

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    @property
    def next_rank(self) -> int:
        """Rank in group of the next member, in ring order."""
        return (self.rank_in_group + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        """Rank in group of the previous member, in ring order."""
        return (self.rank_in_group - 1) % self.world_size

    def _global(self, rank_in_group: int, what: str) -> int:
        if not 0 <= rank_in_group < self.world_size:
            raise ValueError(f"{what}={rank_in_group} out of range for group {self.name} "
                             f"of size {self.world_size}")
        return self.ranks[rank_in_group]

    def _peer(self, rank_in_group: int, what: str) -> int:
        if rank_in_group == self.rank_in_group:
            raise ValueError(f"{what}={rank_in_group} is this rank itself in group {self.name}")
        return self._global(rank_in_group, what)

    # --------------------------------------------------------------------------- collectives

    @_timed("all_reduce")
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over the group. Reduces in place when `t` is contiguous; use the return value."""
        if self.world_size == 1:
            return t
        t = t if t.is_contiguous() else t.contiguous()
        if self.custom is not None and self.custom.applies(t):
            self.last_impl = "custom"
            return self.custom.all_reduce(t)
        if shm := self._shm_for(t, reduce=True):
            return shm.all_reduce(t)
        dist.all_reduce(t, group=self._group_for(t))
        return t

    @_timed("all_reduce_async")
    def all_reduce_async(self, t: torch.Tensor) -> PendingSend:
        """Start summing contiguous `t` over the group in place and return at once; `wait()` on the handle before
        reading `t`. Always the process group, which runs it beside the caller (NCCL on its own stream, gloo on
        its own thread): the custom and shared-memory paths run on the caller's stream or thread, so nothing
        could overlap them."""
        if self.world_size == 1:
            return PendingSend(None, t)
        if not t.is_contiguous():
            raise ValueError("all_reduce_async needs a contiguous tensor (it reduces in place)")
        work = dist.all_reduce(t, group=self._group_for(t), async_op=True)
        return PendingSend(work, t, f"{self.name}_all_reduce_async_{self.backend}" if _timing else None)

    @_timed("all_gather")
    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenation of every rank's `t` along `dim`, in rank order (shapes equal across ranks)."""
        if self.world_size == 1:
            return t
        if t.dim() == 0:
            raise ValueError("all_gather needs a tensor with at least one dimension")
        dim %= t.dim()
        shape = tuple(t.shape)
        flat = torch.empty((self.world_size * shape[0],) + shape[1:], dtype=t.dtype, device=t.device)
        src = t.contiguous()
        if shm := self._shm_for(src, reduce=False):
            shm.all_gather(src, flat)
        else:
            _all_gather_single(flat, src, group=self._group_for(src))  # [world * shape[0], ...]
        out = flat.view((self.world_size,) + shape)  # [world, *shape]
        out = out.movedim(0, dim)  # [*shape[:dim], world, shape[dim], *shape[dim+1:]]
        return out.reshape(shape[:dim] + (self.world_size * shape[dim],) + shape[dim + 1 :])

    @_timed("reduce_scatter")
    def reduce_scatter(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum over the group, then this rank keeps chunk `rank_in_group` of the sum along `dim`."""
        if self.world_size == 1:
            return t
        dim %= t.dim()
        if t.shape[dim] % self.world_size:
            raise ValueError(f"reduce_scatter: size {t.shape[dim]} of dim {dim} is not divisible "
                             f"by group {self.name} size {self.world_size}")
        inp = t.movedim(dim, 0).contiguous()  # [shape[dim], *rest]
        out = torch.empty((inp.shape[0] // self.world_size,) + tuple(inp.shape[1:]),
                          dtype=t.dtype, device=t.device)  # [shape[dim] / world, *rest]
        if shm := self._shm_for(inp, reduce=True):
            shm.reduce_scatter(inp.view(self.world_size, -1), out.view(-1))  # [world, m] -> [m]
        else:
            _reduce_scatter_single(out, inp, group=self._group_for(inp))
        return out.movedim(0, dim).contiguous()

    @_timed("broadcast")
    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `t` on every rank with `t` of rank `src` (rank in group); returns `t`."""
        if self.world_size == 1:
            return t
        buf = t if t.is_contiguous() else t.contiguous()
        dist.broadcast(buf, src=self._global(src, "src"), group=self._group_for(buf))
        if buf is not t:
            t.copy_(buf)
        return t

    @_timed("broadcast_object")
    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """`obj` of rank `src` on every rank, sent msgpack-encoded (codec) over the CPU group."""
        if self.world_size == 1:
            return obj
        src_global = self._global(src, "src")
        if self.rank_in_group == src:
            data = codec.encode(obj)
            dist.broadcast(torch.tensor([len(data)], dtype=torch.int64), src=src_global,
                           group=self.cpu_group)
            dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=src_global,
                           group=self.cpu_group)
            return obj
        size = torch.empty(1, dtype=torch.int64)
        dist.broadcast(size, src=src_global, group=self.cpu_group)
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(buf, src=src_global, group=self.cpu_group)
        return codec.decode(_bytes_of(buf))

    def warm_up(self, p2p: bool = False) -> None:
        """Collective: one tiny all-reduce on the device group (and with `p2p`, a send down the ring order of the
        group, as pipeline stages do), so NCCL creates its communicators and buffers now (before the KV cache is
        sized from the free memory) rather than at the first real step."""
        if self.world_size == 1:
            return
        t = torch.zeros(1, device=self.device)
        dist.all_reduce(t, group=self.device_group)
        if p2p:
            if not self.is_first_rank:
                dist.recv(t, src=self.ranks[self.rank_in_group - 1], group=self.device_group)
            if not self.is_last_rank:
                dist.send(t, dst=self.ranks[self.rank_in_group + 1], group=self.device_group)

    @_timed("all_gather_object")
    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, sent msgpack-encoded (codec) over the CPU group."""
        if self.world_size == 1:
            return [obj]
        data = codec.encode(obj)
        sizes = [torch.empty(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=self.cpu_group)
        longest = max(int(s.item()) for s in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # msgpack: never empty
        bufs = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        dist.all_gather(bufs, mine, group=self.cpu_group)
        return [codec.decode(_bytes_of(b[: int(s.item())])) for b, s in zip(bufs, sizes)]

    @_timed("barrier")
    def barrier(self) -> None:
        """Wait until every rank of the group gets here (over the CPU group)."""
        if self.world_size > 1:
            dist.barrier(group=self.cpu_group)

    # --------------------------------------------------------------------------- point to point

    @_timed("send")
    def send(self, t: torch.Tensor, dst: int) -> None:
        """Send one tensor to rank `dst` (rank in group); the receiver must know its shape and dtype."""
        dist.send(t.contiguous(), dst=self._peer(dst, "dst"), group=self._group_for(t))

    @_timed("recv")
    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into the preallocated contiguous `t` from rank `src` (rank in group); returns `t`."""
        dist.recv(t, src=self._peer(src, "src"), group=self._group_for(t))
        return t

    def _group_for(self, t: torch.Tensor) -> Any:
        """CPU tensors go over the gloo `cpu_group` (an NCCL device group cannot carry them), others the device
        group."""
        return self.cpu_group if t.device.type == "cpu" else self.device_group

    def _tensor_dict_parts(self, d: dict) -> list[tuple[torch.Tensor, Any]]:
        """(tensor, process group) in wire order: metadata size, metadata bytes, each tensor.

        Metadata is `[[key, 1, dtype, shape, on_cpu] | [key, 0, plain value], ...]`, msgpack-encoded.
        Empty tensors travel in the metadata only.
        """
        meta: list[list] = []
        tensors: list[tuple[torch.Tensor, Any]] = []
        for key, value in d.items():
            if isinstance(value, torch.Tensor):
                on_cpu = value.device.type == "cpu"
                meta.append([key, 1, value.dtype, list(value.shape), on_cpu])
                if value.numel():
                    tensors.append((value.detach().contiguous(), self._group_for(value)))
            else:
                meta.append([key, 0, value])
        data = codec.encode(meta)
        head = [(torch.tensor([len(data)], dtype=torch.int64), self.cpu_group),
                (torch.frombuffer(bytearray(data), dtype=torch.uint8), self.cpu_group)]
        return head + tensors

    @_timed("send_tensor_dict")
    def send_tensor_dict(self, d: dict, dst: int) -> None:
        """Send a dict of tensors and plain msgpack-able values to rank `dst` (rank in group)."""
        dst_global = self._peer(dst, "dst")
        for t, group in self._tensor_dict_parts(d):
            dist.send(t, dst=dst_global, group=group)

    def isend_tensor_dict(self, d: dict, dst: int) -> list[PendingSend]:
        """Non-blocking `send_tensor_dict`: returns handles; `wait_all(handles)` before reusing `d`."""
        dst_global = self._peer(dst, "dst")
        return [PendingSend(dist.isend(t, dst=dst_global, group=group), t)
                for t, group in self._tensor_dict_parts(d)]

    @_timed("recv_tensor_dict")
    def recv_tensor_dict(self, src: int) -> dict:
        """Receive what `send_tensor_dict` / `isend_tensor_dict` sent from rank `src` (rank in group).

        CPU tensors arrive on the CPU, device tensors on this group's device.
        """
        src_global = self._peer(src, "src")
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src=src_global, group=self.cpu_group)
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(buf, src=src_global, group=self.cpu_group)
        out: dict = {}
        for entry in codec.decode(_bytes_of(buf)):
            key, is_tensor = entry[0], entry[1]
            if not is_tensor:
                out[key] = entry[2]
                continue
            _, _, dtype, shape, on_cpu = entry
            t = torch.empty(shape, dtype=dtype, device="cpu" if on_cpu else self.device)
            if t.numel():
                dist.recv(t, src=src_global, group=self._group_for(t))
            out[key] = t
        return out
