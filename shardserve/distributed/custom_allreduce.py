"""Custom all-reduce for the GPUs of one host with NVLink peer access: every rank maps every peer's buffer (CUDA IPC)
and a single Triton kernel sums the group's tensors straight out of peer memory (one-shot), with no NCCL call.

Why: a decode step of a tensor-parallel model does two all-reduces per layer of a few KiB to a few MiB. NCCL's
ring needs 2(w-1) steps and a launch of its own; one-shot reads each peer's copy once over NVLink, so small
tensors finish in one kernel of a few microseconds. Larger tensors (over `max_bytes`) go to NCCL.

Buffers. Each rank allocates one zeroed device buffer and shares it (`storage._share_cuda_()` → a CUDA IPC handle,
sent msgpack-encoded over the group's gloo `cpu_group`; never pickled); peers open it with
`UntypedStorage._new_shared_cuda`. The kernel gets a table of every rank's buffer address, in this process's
address space. Layout of a buffer (bytes):

    flags     [MAX_PROGRAMS, MAX_WORLD] int64  flags[p][r] = last generation rank r's program p announced here
    counters  [MAX_PROGRAMS] int64             counters[p] = generations program p of this rank has completed
    data      2 sets x set_bytes               generation g stages its input in set g % 2

Protocol (one launch of `programs` programs, the same grid every call, so program p of every rank runs the same
sequence of generations). Program p of rank r at generation g = counters[p] + 1: copies its tiles of the input into
set g % 2 of its own buffer; stores g into flags[p][r] of every rank's buffer (release, system scope); waits until
flags[p][j] >= g in its own buffer for every j (acquire); then sums tile by tile over ranks 0, 1, ..., w-1 (the
same order on every rank, so all ranks get bit-identical results; halves accumulate in fp32) and writes the result
over the input (in place); then stores counters[p] = g. Program p only reads the tiles that program p of each peer
wrote, so one flag per (program, rank) is the whole barrier. Reuse is safe with two sets: before rank r writes set
g % 2 again at g + 2, its program p waited at g + 1 for every peer's program p, which a peer starts only after its
kernel for g (every program of it) finished reading. A peer is therefore at most one generation ahead (flags only
grow, so `>= g` accepts it) and then writes the other set. No host state changes between calls: the launch can be
captured in a CUDA graph and replayed.

At start-up `create` sums a known tensor on every rank; if any rank gets a wrong sum, every rank falls back to
NCCL, and if the check's kernel does not finish in the collective timeout it raises naming
--disable-custom-all-reduce (a stuck kernel cannot be cancelled). Later, a dead peer leaves the others spinning
in the kernel (as NCCL would hang in its own); the engine sees the rank's process die and fails its requests.

The same kernel runs on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1) over buffers in POSIX
shared memory: that is how tests/dist/test_custom_allreduce.py checks the protocol without a GPU.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CUSTOM_AR_DTYPES", "CUSTOM_AR_MAX_BYTES", "MAX_PROGRAMS", "MAX_WORLD", "CudaIpc", "CustomAllReduce",
           "RankInfo", "buffer_bytes", "unavailable_reason"]

logger = logging.getLogger(__name__)

MAX_WORLD = 8  # ranks of one group (one host's GPUs)
MAX_PROGRAMS = 64  # grid of the kernel, upper bound
CUSTOM_AR_MAX_BYTES = 2 << 20  # one-shot up to this many bytes per rank (a batch-256 decode of an 8B model); NCCL above
CUSTOM_AR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DATA_OFF = (MAX_PROGRAMS * MAX_WORLD + MAX_PROGRAMS) * 8  # flags, then counters; 256-byte aligned


def buffer_bytes(max_bytes: int) -> int:
    """Size of one rank's buffer for tensors of up to `max_bytes`: flags, counters and two data sets."""
    return _DATA_OFF + 2 * _round_up(max_bytes, 256)


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass
class RankInfo:
    """What each rank reports before the group decides to use the custom all-reduce (every rank decides alike)."""
    host: str
    device: int  # CUDA device index in this process's numbering (the workers all see every GPU)
    peers_ok: list[int]  # device indices this rank's device can access peer-to-peer (itself included)
    triton: bool  # triton imports here


def unavailable_reason(infos: list[RankInfo], enabled: bool = True) -> str | None:
    """Why the custom all-reduce cannot serve a group whose ranks reported `infos`, or None if it can."""
    if not enabled:
        return "disabled (--disable-custom-all-reduce)"
    if len(infos) < 2:
        return "a group of one rank needs no all-reduce"
    if len(infos) > MAX_WORLD:
        return f"{len(infos)} ranks; the custom all-reduce handles up to {MAX_WORLD} (one host's GPUs)"
    if len({i.host for i in infos}) > 1:
        return "the group spans hosts (CUDA IPC works within one host)"
    if not all(i.triton for i in infos):
        return "triton is not importable on every rank"
    for i in infos:
        missing = [j.device for j in infos if j.device not in i.peers_ok]
        if missing:
            return f"cuda:{i.device} has no NVLink peer access (with native atomics) to cuda:{missing[0]}"
    return None


class CudaIpc:
    """How `CustomAllReduce.create` shares buffers between the processes of one host: CUDA IPC. (The tests put a
    POSIX shared-memory stand-in with the same five methods in its place to run `create` on CPU ranks.)"""

    def applies(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def local_info(self, device: torch.device) -> RankInfo:
        """Peers = the GPUs this one reaches with native peer atomics (NVLink; the kernel's flags are atomics into
        peer memory, which PCIe peer access does not guarantee)."""
        try:
            import triton  # noqa: F401
            has_triton = True
        except ImportError:
            has_triton = False
        me = device.index if device.index is not None else torch.cuda.current_device()
        peers = [d for d in range(torch.cuda.device_count())
                 if d == me or (torch.cuda.can_device_access_peer(me, d) and _native_p2p_atomics(me, d))]
        return RankInfo(socket.gethostname(), me, peers, has_triton)

    def alloc(self, nbytes: int, device: torch.device) -> torch.Tensor:
        buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        torch.cuda.synchronize(device)  # peers must not see the buffer before it is zeroed
        return buf

    def export(self, buf: torch.Tensor) -> list:
        """torch's IPC handle of the buffer's storage: [device, handle, size, offset, ref-counter handle, ref-counter
        offset, event handle, event sync required] (ints, bytes and a bool: msgpack-able)."""
        return list(buf.untyped_storage()._share_cuda_())

    def open(self, handle: list, device: torch.device) -> tuple[Any, int]:
        """(what keeps the mapping alive, its address in this process) for a peer's handle. torch opens a handle on
        the device named in it, which is the owner's; naming ours instead maps the peer's memory into our context
        (cudaIpcOpenMemHandle enables our peer access to it), which is the device our kernel runs on. The buffer
        was synchronized before export, so no event wait."""
        mine = list(handle)
        mine[0], mine[7] = device.index if device.index is not None else torch.cuda.current_device(), False
        with torch.cuda.device(device):
            storage = torch.UntypedStorage._new_shared_cuda(*mine)
        return storage, storage.data_ptr()


def _native_p2p_atomics(src: int, dst: int) -> bool:
    """Whether GPU `src` can do native atomics on GPU `dst`'s memory (CUDA driver API; False if it cannot be asked)."""
    import ctypes
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        a, b, value = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(a), src) or cuda.cuDeviceGet(ctypes.byref(b), dst):
            return False
        native_atomic_supported = 3  # CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED
        return cuda.cuDeviceGetP2PAttribute(ctypes.byref(value), native_atomic_supported, a, b) == 0 \
            and value.value == 1
    except (OSError, AttributeError):
        return False


class CustomAllReduce:
    """One-shot all-reduce over buffers every rank has mapped: `all_reduce(t)` sums `t` in place.

    `ptrs[r]` is the address of rank r's buffer (of `buffer_bytes(max_bytes)` bytes, zeroed before first use) in
    this process; `keep` holds whatever keeps those mappings alive. `create(group)` builds one over CUDA IPC.
    """

    def __init__(self, ptrs: list[int], rank: int, device: torch.device, max_bytes: int = CUSTOM_AR_MAX_BYTES,
                 keep: Any = None, programs: int = 32, block: int = 1024):
        if not 2 <= len(ptrs) <= MAX_WORLD:
            raise ValueError(f"custom all-reduce needs 2..{MAX_WORLD} ranks, got {len(ptrs)}")
        if not 1 <= programs <= MAX_PROGRAMS or block & (block - 1):
            raise ValueError(f"programs must be 1..{MAX_PROGRAMS} and block a power of two")
        self.world, self.rank, self.device = len(ptrs), rank, torch.device(device)
        self.max_bytes, self.programs, self.block = max_bytes, programs, block
        self.set_bytes = _round_up(max_bytes, 256)
        self._ptrs = torch.tensor(ptrs, dtype=torch.int64, device=self.device)  # [world] addresses
        self._keep = keep
        self.calls = 0  # launches made by this process (host side; graph replays are not counted)

    def applies(self, t: torch.Tensor) -> bool:
        """Whether `t` takes this path: on our device, a float dtype, contiguous, 1..max_bytes bytes. Tensor
        properties only, so every rank of the group answers alike."""
        nbytes = t.numel() * t.element_size()
        return (t.device == self.device and t.dtype in CUSTOM_AR_DTYPES and t.is_contiguous()
                and 0 < nbytes <= self.max_bytes)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the group in place (ranks in order 0..w-1, halves in fp32); returns `t`."""
        if not self.applies(t):
            raise ValueError(f"custom all-reduce takes contiguous {CUSTOM_AR_DTYPES} tensors of 1..{self.max_bytes} "
                             f"bytes on {self.device}; got {t.dtype} {list(t.shape)} on {t.device}")
        from shardserve.distributed.custom_allreduce_kernel import one_shot_all_reduce
        one_shot_all_reduce[(self.programs,)](t, self._ptrs, t.numel(), self.rank, self.set_bytes, WORLD=self.world,
                                              PROGRAMS=self.programs, BLOCK=self.block, num_warps=8)
        # (Triton launches on the current device: the worker sets it to the group's device at start-up)
        self.calls += 1
        return t

    @classmethod
    def create(cls, group: Any, max_bytes: int = CUSTOM_AR_MAX_BYTES, enabled: bool = True, ipc: Any = None,
               **kwargs: Any) -> "CustomAllReduce | None":
        """Collective over `group` (a GroupCoordinator): map every rank's buffer (over CUDA IPC unless `ipc` says
        otherwise), or return None on every rank, with the reason logged, where the custom all-reduce cannot work.
        `kwargs` go to the constructor (programs, block)."""
        ipc = ipc or CudaIpc()
        device = group.device
        if not ipc.applies(device):
            return None
        info = ipc.local_info(device) if enabled else RankInfo("", -1, [], False)
        infos = [RankInfo(**d) for d in group.all_gather_object(info.__dict__)]
        reason = unavailable_reason(infos, enabled)
        if reason is not None:
            logger.info("group %s: custom all-reduce off: %s; using %s", group.name, reason, group.backend)
            return None
        own = ipc.alloc(buffer_bytes(max_bytes), device)
        try:  # export or open can fail (an allocator setting, a driver that refuses): every rank then falls back
            handle, error = ipc.export(own), ""
        except (RuntimeError, AttributeError, OSError) as e:
            handle, error = [], f"exporting the buffer failed: {e}"
        handles = group.all_gather_object([handle, error])
        keep: list[Any] = [ipc]  # whatever the ipc holds for our own buffer lives as long as we do
        ptrs: list[int] = []
        error = next((f"rank {r}: {err}" for r, (_, err) in enumerate(handles) if err), "")
        for r, (peer_handle, _) in enumerate(handles):
            if error:
                break
            if r == group.rank_in_group:
                keep.append(own)
                ptrs.append(own.data_ptr())
                continue
            try:
                mapping, ptr = ipc.open(peer_handle, device)
            except (RuntimeError, AttributeError, TypeError, OSError, ValueError) as e:
                error = f"rank {group.rank_in_group} could not open rank {r}'s buffer: {e}"
                break
            keep.append(mapping)
            ptrs.append(ptr)
        # every rank decides alike, and none writes a flag before every rank has mapped every buffer
        errors = [err for err in group.all_gather_object(error) if err]
        if errors:
            logger.warning("group %s: custom all-reduce off: %s; using %s", group.name, errors[0], group.backend)
            return None
        car = cls(ptrs, group.rank_in_group, device, max_bytes, keep=keep, **kwargs)
        wrong = [err for err in group.all_gather_object(car.self_test(group.timeout_s)) if err]
        if wrong:
            logger.warning("group %s: custom all-reduce off: its start-up check failed (%s); using %s", group.name,
                           wrong[0], group.backend)
            return None
        logger.info("group %s: custom all-reduce on %d ranks, up to %d bytes", group.name, len(ptrs), max_bytes)
        return car

    def self_test(self, timeout_s: float = 60.0) -> str:
        """Sum a known tensor (rank r contributes r + 1 everywhere, over several tiles) and check it; "" if right.
        A kernel still spinning after `timeout_s` (a peer's flags never arrive) cannot be stopped, so that raises
        with the way out, instead of hanging the engine at its first step."""
        n = min(self.max_bytes // 4, self.programs * self.block * 2 + 3)
        x = torch.full((n,), float(self.rank + 1), device=self.device)
        self.all_reduce(x)
        if x.is_cuda:
            done, deadline = torch.cuda.Event(), time.monotonic() + timeout_s
            done.record()
            while not done.query():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the custom all-reduce's start-up check did not finish within {timeout_s:g} s "
                                       "(a peer GPU never signalled); restart with --disable-custom-all-reduce")
                time.sleep(1e-3)
        want = self.world * (self.world + 1) / 2
        bad = int((x != want).sum().item())
        return f"rank {self.rank}: {bad} of {n} elements wrong" if bad else ""
