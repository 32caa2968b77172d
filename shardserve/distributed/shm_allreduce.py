"""Shared-memory collectives (all_reduce, all_gather, reduce_scatter) for the CPU ranks of one group on one host.

A `ShmCommunicator` is made once per group, on first use, by every rank of the group at the same
collective call (`ShmCommunicator.create`, coordinated over the group's gloo `cpu_group`): rank 0
creates a randomly named segment (`ssar_{its pid}_{random}`) and broadcasts its name, nonce and size;
every rank attaches, checks the header and publishes its pid; the ranks agree (gloo MIN) that all of
them attached, and rank 0 then *unlinks the name at once*. The mapping lives on in every rank, so
nothing is left in /dev/shm once set-up is done, even after kill -9, and two engines on one host never
share a segment; a rank 0 killed during set-up leaves a name carrying its pid, which
`message_queue.reap_orphaned_segments` removes. If any rank
cannot attach (another host, no /dev/shm, not enough space), every rank gets None and the group
keeps using gloo.

Segment layout (u64 words, native-endian; 64-byte lines):

    line 0        magic, version, world, slot_bytes, nonce, abort (1 + rank that gave up; 0 = none)
    pids          [world] words, rounded up to whole lines
    arrive        [world] lines: arrive[r] = chunks rank r has published so far
    data          2 buffer sets x world slots x slot_bytes (page aligned)

Protocol. Tensors are processed in chunks of at most `slot_bytes`; chunk number s (1-based, counted
over the life of the communicator, the same on every rank because collectives are issued in the
same order) uses buffer set s % 2. Rank r copies its part of the chunk into its slot of that set,
stores arrive[r] = s, waits until arrive[j] >= s for every j, then reads every slot of the set and
writes its result (a sum in fixed rank order 0, 1, ..., so every rank gets bit-identical values,
or a rank-ordered concatenation). One barrier per chunk is enough: before rank r overwrites set
s % 2 again at chunk s + 2 it has waited, at chunk s + 1, for arrive[j] >= s + 1 for every j, and
rank j stores that only after it finished reading chunk s. A rank is therefore at most one chunk
ahead of any peer, and it then writes the other buffer set.

Memory ordering is the argument of `message_queue.py`: each counter is one aligned 8-byte store
(single-copy atomic on x86-64 and ARMv8); on x86-64 (TSO) the payload copy is visible before the
counter store after it, and a reader's payload loads are ordered after its counter load and before
its next counter store. On weakly ordered CPUs this rests, as there, on the distance between them.

Waiting spins for `SPIN_S` calling sched_yield (so a peer sharing the core still runs), then sleeps.
On Linux (x86-64, arm64) it sleeps in futex(2) on the late peer's arrive word (its low 32 bits): every
rank calls FUTEX_WAKE on its own word right after storing it (about a microsecond; the syscall is also
a full barrier), and the kernel compares the word under its lock, so a wake-up is never lost and a
sleeper wakes as soon as the peer arrives, using no CPU meanwhile. Elsewhere it sleeps with a backoff
from 10 us to 100 us (500 us after 10 ms). Every ~50 ms of waiting it checks that the late peers'
processes still exist (not zombies) and whether a peer gave up; after `timeout_s` it raises
ShmCollectiveTimeout (a TimeoutError) naming the late ranks and marks the segment aborted, so peers
raise too. After any such error the communicator is broken: every later call raises, none hangs.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import secrets
import sys
import time
import weakref
from multiprocessing import shared_memory
from typing import Any

import torch
import torch.distributed as dist

from shardserve.distributed.message_queue import _attach_untracked, owned_segment_name

__all__ = ["REDUCE_DTYPES", "SLOT_BYTES", "ShmCollectiveError", "ShmCollectiveTimeout", "ShmCommunicator",
           "close_all", "shm_applies"]

logger = logging.getLogger(__name__)

_MAGIC = 0x5353_4152_5F53_484D  # "SSAR_SHM"
_VERSION = 1
_W_MAGIC, _W_VERSION, _W_WORLD, _W_SLOT, _W_NONCE, _W_ABORT = range(6)
_LINE = 8  # u64 words per 64-byte line

SLOT_BYTES = 1 << 20  # chunk size: one rank's share of one buffer set
SPIN_S = 200e-6  # spin (yielding the core) this long before sleeping
_SLEEP_MIN_S, _SLEEP_CAP_S, _IDLE_AFTER_S, _SLEEP_IDLE_CAP_S = 10e-6, 100e-6, 10e-3, 500e-6
_CHECK_EVERY_S = 0.05  # liveness / abort checks while sleeping

# dtypes the sum supports (all_gather moves bytes, so it takes any dtype)
REDUCE_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
                           torch.int16, torch.int32, torch.int64, torch.uint8})

_memmove = ctypes.memmove
# futex(2): shared (not FUTEX_PRIVATE) operations, since the waiters are other processes
_NR_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine().lower())
_FUTEX_WAIT, _FUTEX_WAKE, _INT_MAX = 0, 1, 0x7FFF_FFFF
_live: "weakref.WeakSet[ShmCommunicator]" = weakref.WeakSet()


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _futex_syscall() -> Any:
    """libc `syscall` for futex(2) on little-endian Linux x86-64 / arm64, else None (then waits sleep-poll)."""
    if sys.platform != "linux" or sys.byteorder != "little" or _NR_FUTEX is None:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    return fn


class ShmCollectiveError(RuntimeError):
    """A peer died or gave up; the communicator cannot be used again."""


class ShmCollectiveTimeout(ShmCollectiveError, TimeoutError):
    """A peer did not arrive within the collective timeout; the communicator cannot be used again."""


def shm_applies(mode: str, t: torch.Tensor, reduce: bool, max_bytes: int) -> bool:
    """Whether a call in `mode` (auto | gloo | shm) takes the shm path for `t`: CPU tensor, a summable
    dtype for reductions, and in `auto` at most `max_bytes`. Tensor properties only, so every rank agrees."""
    return (mode != "gloo" and t.is_cpu and (not reduce or t.dtype in REDUCE_DTYPES)
            and (mode == "shm" or t.numel() * t.element_size() <= max_bytes))


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _layout(world: int, slot_bytes: int) -> tuple[int, int, int, int]:
    """(pid word, arrive word, data byte offset, total bytes) of a segment."""
    pid_word = _LINE
    arrive_word = _round_up(pid_word + world, _LINE)
    data = _round_up((arrive_word + world * _LINE) * 8, 4096)
    return pid_word, arrive_word, data, data + 2 * world * slot_bytes


def _process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as dead): /proc where there is one, else signal 0."""
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
        except FileNotFoundError:
            return False
        except (OSError, IndexError):
            pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class ShmCommunicator:
    """This rank's end of one group's shared-memory segment; see the module docstring."""

    def __init__(self, shm: shared_memory.SharedMemory, world: int, rank: int, slot_bytes: int,
                 label: str, timeout_s: float):
        self._shm = shm
        self.world, self.rank, self.slot_bytes = world, rank, slot_bytes
        self.label = label  # e.g. "group tp (ranks [0, 1])", for error messages
        self.timeout_s = timeout_s
        pid_word, self._arrive_word, data, total = _layout(world, slot_bytes)
        self._q = shm.buf[:data].cast("Q")  # control words
        self._base = torch.frombuffer(shm.buf, dtype=torch.uint8, count=total - data, offset=data)
        self._my_word = self._arrive_word + rank * _LINE
        self._peers = [j for j in range(world) if j != rank]
        self._pids = {j: int(self._q[pid_word + j]) for j in self._peers}
        self._watch = {j: p for j, p in self._pids.items() if p and _process_alive(p)}  # visible pids
        self._seq = int(self._q[self._my_word])
        self._base_ptr = self._base.data_ptr()
        seg = self._base_ptr - data  # address of the segment's first byte
        self._word_addr = [ctypes.c_void_p(seg + (self._arrive_word + j * _LINE) * 8) for j in range(world)]
        self._futex = _futex_syscall()
        self._ts = _Timespec(0, int(_CHECK_EVERY_S * 1e9))
        self._nap = ctypes.byref(self._ts)
        self._rows: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self._views: dict[tuple, list[torch.Tensor]] = {}
        self._broken: str | None = None
        _live.add(self)

    # ------------------------------------------------------------------------------- set-up

    @classmethod
    def create(cls, group: Any, slot_bytes: int = SLOT_BYTES) -> "ShmCommunicator | None":
        """Collective over `group` (a GroupCoordinator): every rank gets a communicator, or every rank None."""
        world, rank = group.world_size, group.rank_in_group
        label = f"group {group.name} (ranks {group.ranks})"
        pid_word, _, data, total = _layout(world, slot_bytes)
        shm: shared_memory.SharedMemory | None = None
        info: dict[str, Any] = {}
        if rank == 0:
            try:
                st = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
                if st is not None and st.f_bavail * st.f_frsize < 2 * total:  # margin: a full tmpfs is SIGBUS
                    raise OSError(f"/dev/shm has {st.f_bavail * st.f_frsize} bytes free; need 2 x {total}")
                shm = shared_memory.SharedMemory(name=owned_segment_name("ssar"), create=True, size=total)
                q = shm.buf[:data].cast("Q")
                nonce = secrets.randbits(62)
                q[_W_VERSION], q[_W_WORLD], q[_W_SLOT], q[_W_NONCE] = _VERSION, world, slot_bytes, nonce
                q[_W_MAGIC] = _MAGIC
                q.release()
                info = {"name": shm.name, "nonce": nonce, "total": total}
            except OSError as e:
                info = {"error": str(e)}
        info = group.broadcast_object(info, src=0)
        ok = "error" not in info
        if ok and rank != 0:
            try:
                shm = _attach_untracked(info["name"])
                q = shm.buf[:data].cast("Q")
                want = [_MAGIC, _VERSION, world, slot_bytes, info["nonce"]]
                good = shm.size >= total and [q[i] for i in range(5)] == want
                q.release()
                if not good:
                    raise ValueError("header mismatch")
            except (OSError, ValueError) as e:
                info["error"], ok = f"rank {rank}: {e}", False
        if ok:
            q = shm.buf[:data].cast("Q")
            q[pid_word + rank] = os.getpid()
            q.release()
            mine = torch.frombuffer(shm.buf, dtype=torch.uint8, count=total - data, offset=data)
            for s in range(2):  # fault in this rank's pages now, not inside the first timed call
                mine[(s * world + rank) * slot_bytes:(s * world + rank + 1) * slot_bytes].zero_()
            del mine
        flag = torch.tensor([int(ok)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group.cpu_group)
        if rank == 0 and shm is not None:
            shm.unlink()  # every rank has it mapped (or gives up now): no name left behind
        if not flag.item():
            if shm is not None:
                shm.close()
            logger.warning("shared-memory collectives off for %s (%s); using gloo", label,
                           info.get("error", "a peer could not attach"))
            return None
        return cls(shm, world, rank, slot_bytes, label, float(group.timeout_s))

    def close(self) -> None:
        """Unmap the segment (its name is already gone); later calls raise."""
        if self._shm is None:
            return
        self._broken = self._broken or f"shared-memory communicator of {self.label} is closed"
        self._rows.clear()
        self._views.clear()
        self._base = None
        self._q.release()
        shm, self._shm = self._shm, None
        try:
            shm.close()
        except BufferError:  # a tensor view is still alive somewhere; the mapping goes with it
            pass
        _live.discard(self)

    def __del__(self) -> None:  # dropped without close(): release the views before the mapping
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------------------- sync

    def _rows_of(self, seq: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """The world slots of chunk `seq`'s buffer set as 1-D `dtype` tensors, rank order."""
        key = (seq & 1, dtype)
        rows = self._rows.get(key)
        if rows is None:
            n = self.slot_bytes
            start = (seq & 1) * self.world * n
            rows = [self._base[start + j * n:start + (j + 1) * n].view(dtype) for j in range(self.world)]
            self._rows[key] = rows
        return rows

    def _arrive_and_wait(self, seq: int, op: str) -> None:
        """Publish chunk `seq` of this rank, then wait until every peer published it too."""
        q, base = self._q, self._arrive_word
        q[self._my_word] = seq
        if self._futex is not None:  # wake peers asleep on our word (a syscall: also a full barrier)
            self._futex(_NR_FUTEX, self._word_addr[self.rank], _FUTEX_WAKE, _INT_MAX, None, None, 0)
        late = [j for j in self._peers if q[base + j * _LINE] < seq]
        if not late:
            return
        start = time.perf_counter()
        nap, next_check = _SLEEP_MIN_S, start + _CHECK_EVERY_S
        while True:
            late = [j for j in late if q[base + j * _LINE] < seq]
            if not late:
                return
            now = time.perf_counter()
            waited = now - start
            if waited < SPIN_S:
                os.sched_yield()
                continue
            if now >= next_check:
                next_check = now + _CHECK_EVERY_S
                self._check_peers(late, op, waited)
            if self._futex is not None:
                self._futex_wait(late[0], q[base + late[0] * _LINE])
            else:
                time.sleep(nap)
                nap = min(nap * 2, _SLEEP_CAP_S if waited < _IDLE_AFTER_S else _SLEEP_IDLE_CAP_S)

    def _futex_wait(self, peer: int, seen: int) -> None:
        """Sleep until `peer`'s arrive word changes from `seen`, a wake, a signal or _CHECK_EVERY_S passes."""
        low = seen & 0xFFFF_FFFF  # the kernel compares the low (little-endian: first) 32 bits
        expected = low - (1 << 32) if low >= 1 << 31 else low
        if self._futex(_NR_FUTEX, self._word_addr[peer], _FUTEX_WAIT, expected, self._nap, None, 0) == -1:
            if ctypes.get_errno() not in (errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT):
                logger.warning("futex wait failed (errno %d); %s falls back to sleeping", ctypes.get_errno(),
                               self.label)
                self._futex = None

    def _check_peers(self, late: list[int], op: str, waited: float) -> None:
        q = self._q
        why, timed_out = None, False
        if q[_W_ABORT]:
            why = f"rank {q[_W_ABORT] - 1} gave up (see its error)"
        dead = [j for j in late if j in self._watch and not _process_alive(self._watch[j])]
        if dead:
            why = ", ".join(f"rank {j} (pid {self._watch[j]}) exited" for j in dead)
        elif why is None and waited >= self.timeout_s:
            timed_out = True
            why = (f"rank(s) {late} did not arrive within {self.timeout_s:g} s (stuck or dead peer; "
                   "the limit is the collective timeout, --collective-timeout-s)")
        if why is None:
            return
        if not q[_W_ABORT]:
            q[_W_ABORT] = self.rank + 1
        self._broken = f"shared-memory {op} on {self.label}, rank {self.rank}: {why}"
        raise (ShmCollectiveTimeout if timed_out else ShmCollectiveError)(self._broken)

    def _next(self, op: str) -> int:
        if self._broken or self._q[_W_ABORT]:
            if not self._broken:
                self._broken = (f"shared-memory {op} on {self.label}, rank {self.rank}: "
                                f"rank {self._q[_W_ABORT] - 1} gave up (see its error)")
            raise ShmCollectiveError(self._broken)
        self._seq += 1
        return self._seq

    # ------------------------------------------------------------------------------- collectives
    # Copies in and out of the segment are ctypes.memmove by address (a fraction of a microsecond,
    # where a torch slice costs a few); sums are torch ops on views of the slots, cached per shape.

    def _addr(self, seq: int, rank: int) -> int:
        """Address of `rank`'s slot in chunk `seq`'s buffer set."""
        return self._base_ptr + ((seq & 1) * self.world + rank) * self.slot_bytes

    def _shaped(self, seq: int, dtype: torch.dtype, shape: torch.Size) -> list[torch.Tensor]:
        """Every rank's slot of chunk `seq`'s set viewed as a `dtype` tensor of `shape`, rank order."""
        key = (seq & 1, dtype, shape)
        views = self._views.get(key)
        if views is None:
            if len(self._views) >= 256:
                self._views.clear()
            n = shape.numel()
            views = [row[:n].view(shape) for row in self._rows_of(seq, dtype)]
            self._views[key] = views
        return views

    def _sum(self, parts: list[torch.Tensor], out: torch.Tensor) -> None:
        """out = parts[0] + parts[1] + ... in this order (bit-identical on every rank)."""
        if len(parts) == 2:
            torch.add(parts[0], parts[1], out=out)
        elif out.dtype in (torch.float16, torch.bfloat16):
            acc = parts[0].float()  # accumulate half types in fp32, round once
            for p in parts[1:]:
                acc.add_(p)
            out.copy_(acc)
        else:
            torch.add(parts[0], parts[1], out=out)
            for p in parts[2:]:
                out.add_(p)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of contiguous CPU `t` over the group, written into `t` in place."""
        size, ptr = t.numel() * t.element_size(), t.data_ptr()
        if size <= self.slot_bytes:  # one chunk: the decode-time case, kept short
            seq = self._next("all_reduce")
            _memmove(self._addr(seq, self.rank), ptr, size)
            self._arrive_and_wait(seq, "all_reduce")
            self._sum(self._shaped(seq, t.dtype, t.shape), t)
            return t
        flat, item = t.view(-1), t.element_size()
        cap = self.slot_bytes // item
        for a in range(0, flat.numel(), cap):
            m = min(cap, flat.numel() - a)
            seq = self._next("all_reduce")
            _memmove(self._addr(seq, self.rank), ptr + a * item, m * item)
            self._arrive_and_wait(seq, "all_reduce")
            self._sum([row[:m] for row in self._rows_of(seq, t.dtype)], flat[a:a + m])
        return t

    def all_gather(self, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Copy every rank's contiguous `t` into contiguous `out` ([world * t bytes], same dtype), rank order."""
        size, src, dst = t.numel() * t.element_size(), t.data_ptr(), out.data_ptr()
        for a in range(0, size, self.slot_bytes):
            m = min(self.slot_bytes, size - a)
            seq = self._next("all_gather")
            _memmove(self._addr(seq, self.rank), src + a, m)
            self._arrive_and_wait(seq, "all_gather")
            for j in range(self.world):
                _memmove(dst + j * size + a, self._addr(seq, j), m)
        return out

    def reduce_scatter(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = chunk `rank` of the sum of `inp` over the group; `inp` is [world, m] contiguous, `out` [m]."""
        world, r, item = self.world, self.rank, inp.element_size()
        m_total = inp.shape[1]
        cap = self.slot_bytes // item // world  # output elements per chunk
        for a in range(0, m_total, cap):
            c = min(cap, m_total - a)
            seq = self._next("reduce_scatter")
            mine = self._addr(seq, r)
            for k in range(world):  # piece k of this chunk -> [world, c] in this rank's slot
                _memmove(mine + k * c * item, inp.data_ptr() + (k * m_total + a) * item, c * item)
            self._arrive_and_wait(seq, "reduce_scatter")
            self._sum([row[r * c:(r + 1) * c] for row in self._rows_of(seq, inp.dtype)], out[a:a + c])
        return out


def close_all() -> None:
    """Close every communicator of this process (destroy_distributed calls this)."""
    for comm in list(_live):
        comm.close()
