"""Control-plane channel: a single-writer, multi-reader broadcast ring of msgpack messages in shared memory.

The engine broadcasts each step's work to every worker through one `MessageQueue`; each worker
returns results through its own queue with `n_readers=1` (worker writes, engine reads). Every
reader sees every message, in order. Messages are `codec.encode`d (msgpack; never pickle).

Segment layout (one `SharedMemory` with a random name; all words native-endian u64):

    header    magic, version, n_readers, chunk_bytes, n_chunks, closed, chunks written, reserved
    slot_seq  [n_chunks]      sequence number (1-based) of the chunk now held by each slot
    done      [n_readers] x 8 chunks consumed by each reader (one 64-byte line per reader)
    chunks    [n_chunks] x (16-byte chunk header: payload bytes, is-last flag | chunk_bytes payload)

Protocol. Chunk s (0-based, counted over the life of the queue) lives in slot s % n_chunks. The
writer may fill it once every reader has consumed chunk s - n_chunks (`done[r] >= s - n_chunks + 1`);
it writes the payload and chunk header, and stores `slot_seq[slot] = s + 1` last. Reader r waits for
`slot_seq[slot] == s + 1`, copies the payload out, then stores `done[r] = s + 1`. A message larger
than one chunk spans consecutive chunks, the last one flagged, so any size works with a small ring.

Memory ordering. Each counter is one aligned 8-byte store (`memoryview.cast("Q")` item assignment is
a single 8-byte memcpy), which x86-64 and ARMv8 make single-copy atomic. Readers compare `slot_seq`
for *equality* with the value they expect, so even a torn read could not let them in early. On
x86-64 (TSO) stores become visible in program order and loads are not reordered with older loads, so
a reader that sees the new `slot_seq` also sees the payload, and the writer never overwrites a chunk
before the reader's copy of it is done. CPython offers no fences, so on weakly ordered CPUs (ARM)
correctness is not guaranteed by the architecture; it rests on the hundreds of instructions between
the payload copy and the counter store (the same assumption vLLM's shared-memory broadcast makes).

Waiting: spin for ~50 us calling sched_yield (low latency when busy, and a peer sharing the core
still runs), then sleep with a backoff doubling from 10 us to 100 us; after 10 ms of waiting the cap
grows to 500 us, so an idle reader costs about 1-2% of a core. `stop()` sets the closed flag: a
reader blocked in `dequeue` with nothing left to read, or a writer blocked in `enqueue`, raises
`QueueClosed`. A blocked `enqueue` also calls its `check` every 50 ms, so a writer can give up on a reader that
died or stalled (the executor's liveness test) instead of waiting forever for a chunk it will never free.

Names: `ssmq_{creator pid}_{random}` (and `sshb_` heartbeat boards, `ssar_` all-reduce segments);
`reap_orphaned_segments` unlinks those whose creator is gone.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import threading
import time
from collections import deque
from multiprocessing import resource_tracker, shared_memory
from typing import Any, Callable

from shardserve.distributed import codec
__all__ = ["MessageQueue", "QueueClosed", "owned_segment_name", "reap_orphaned_segments"]

_MAGIC = 0x5153_4D5F_5353  # "SS_MQ" tag
_VERSION = 1
# header word indices
_W_MAGIC, _W_VERSION, _W_READERS, _W_CHUNK, _W_NCHUNKS, _W_CLOSED, _W_WRITTEN = range(7)
_HEADER_WORDS = 8
_LINE_WORDS = 8  # 64-byte cache line
_CHUNK_HEADER_BYTES = 16  # payload bytes, is-last flag

_SPIN_S = 50e-6  # spin (yielding the core) this long before sleeping
_SLEEP_MIN_S = 10e-6  # first nap; doubles up to the cap
_SLEEP_CAP_S = 100e-6  # cap while the wait is short (between engine steps)
_IDLE_AFTER_S = 10e-3  # after waiting this long the queue is idle ...
_SLEEP_IDLE_CAP_S = 500e-6  # ... and naps may grow to this (idle readers ~1-2% of a core)

_CHECK_EVERY_S = 0.05  # a blocked enqueue calls its `check` this often

_tracker_patch_lock = threading.Lock()

# prefixes of the segments named by `owned_segment_name`: rings, heartbeat boards, the CPU all-reduce
OWNED_PREFIXES = ("ssmq", "sshb", "ssar")
_OWNED_RE = re.compile(rf"^({'|'.join(OWNED_PREFIXES)})_(\d+)_[0-9a-f]+$")


def owned_segment_name(prefix: str) -> str:
    """A random segment name that carries the creator's pid (`{prefix}_{pid}_{12 hex}`, within macOS's 31
    characters), so that `reap_orphaned_segments` can tell the leftovers of a dead creator."""
    return f"{prefix}_{os.getpid()}_{secrets.token_hex(6)}"


def reap_orphaned_segments(shm_dir: str = "/dev/shm") -> list[str]:
    """Unlink this user's pid-named segments (`OWNED_PREFIXES`: rings `ssmq_*`, heartbeat boards `sshb_*`, CPU
    all-reduce `ssar_*`) whose creating process no longer runs.

    The creator unlinks its segments on every exit Python sees, and its resource tracker after a SIGKILL; this
    catches what is left when both were killed (e.g. a whole process group). Returns the names it removed."""
    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed  # no /dev/shm (macOS): nothing to sweep
    uid = os.getuid()
    for name in names:
        m = _OWNED_RE.match(name)
        if not m:
            continue
        pid = int(m.group(2))
        try:
            if os.stat(os.path.join(shm_dir, name)).st_uid != uid:
                continue
            os.kill(pid, 0)
            continue  # the creator still runs
        except ProcessLookupError:
            pass
        except OSError:  # PermissionError: a live process of another user; FileNotFoundError: already gone
            continue
        try:
            os.unlink(os.path.join(shm_dir, name))
            removed.append(name)
        except OSError:
            pass
    return removed


class QueueClosed(EOFError):
    """The queue was stopped: nothing more will be written (readers) or read (writer)."""


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class _Layout:
    """Word offsets of the segment's parts, computed from the three sizes."""

    def __init__(self, n_readers: int, chunk_bytes: int, n_chunks: int):
        self.n_readers, self.chunk_bytes, self.n_chunks = n_readers, chunk_bytes, n_chunks
        self.slot_seq = _HEADER_WORDS  # word index of slot_seq[0]
        self.done = _round_up(self.slot_seq + n_chunks, _LINE_WORDS)  # word index of done[0]
        chunks_word = self.done + n_readers * _LINE_WORDS
        self.chunk_stride = _round_up(_CHUNK_HEADER_BYTES + chunk_bytes, 64)  # bytes
        self.chunks = chunks_word * 8  # byte offset of chunk 0
        self.total_bytes = self.chunks + n_chunks * self.chunk_stride

    def chunk_word(self, slot: int) -> int:
        return (self.chunks + slot * self.chunk_stride) // 8


def _attach_untracked(name: str) -> shared_memory.SharedMemory:
    """Open an existing segment without registering it with this process's resource tracker.

    Python < 3.13 registers every attach, so a reader's tracker would unlink the writer's segment
    when the reader exits. Only the creator owns (and unlinks) the segment.
    """
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    with _tracker_patch_lock:
        register = resource_tracker.register
        resource_tracker.register = lambda *args, **kwargs: None
        try:
            return shared_memory.SharedMemory(name=name)
        finally:
            resource_tracker.register = register


class MessageQueue:
    """One end (the writer or one reader) of a shared-memory broadcast ring; see the module docstring."""

    def __init__(self, shm: shared_memory.SharedMemory, layout: _Layout, *, owner: bool,
                 reader_index: int | None):
        self._shm = shm
        self._layout = layout
        self._owner = owner
        self._pid = os.getpid()  # a forked copy of the owner must not unlink the segment
        self._reader_index = reader_index  # None: this end writes
        self._buf = shm.buf
        self._q = self._buf[: layout.total_bytes].cast("Q")  # u64 words of the whole segment
        if reader_index is None:
            self._seq = self._q[_W_WRITTEN]  # chunks written so far
        else:
            self._seq = self._q[layout.done + reader_index * _LINE_WORDS]  # chunks consumed so far
        self._min_done = 0  # writer: lowest `done` seen over readers (they only grow)
        self._backlog: deque[memoryview] = deque()  # writer: messages (or tails) not yet written
        self._parts: list[bytes] = []  # reader: chunks of a message read before a timeout
        self._closed_locally = False

    # ------------------------------------------------------------------------------- lifecycle

    @classmethod
    def create(cls, n_readers: int, chunk_bytes: int = 1 << 20, n_chunks: int = 8, *,
               reader_index: int | None = None) -> "MessageQueue":
        """Create a new ring (this process owns and finally unlinks it).

        By default the creator is the writer. With `reader_index=k` the creator is reader k
        instead, and the writer joins with `attach_writer(handle)` (e.g. the engine owns the return
        queue of a worker, so the segment is cleaned up even if the worker dies).
        """
        if n_readers < 1 or chunk_bytes < 1 or n_chunks < 1:
            raise ValueError(f"need n_readers, chunk_bytes, n_chunks >= 1, got "
                             f"{n_readers}, {chunk_bytes}, {n_chunks}")
        if reader_index is not None and not 0 <= reader_index < n_readers:
            raise ValueError(f"reader_index {reader_index} out of range for {n_readers} readers")
        layout = _Layout(n_readers, chunk_bytes, n_chunks)
        shm = shared_memory.SharedMemory(name=owned_segment_name("ssmq"), create=True,
                                         size=layout.total_bytes)
        q = shm.buf[: layout.total_bytes].cast("Q")
        for i in range(layout.chunks // 8):  # fresh segments are zeroed; be explicit anyway
            q[i] = 0
        q[_W_VERSION], q[_W_READERS], q[_W_CHUNK], q[_W_NCHUNKS] = (
            _VERSION, n_readers, chunk_bytes, n_chunks)
        q[_W_MAGIC] = _MAGIC  # last: marks the header complete
        q.release()
        return cls(shm, layout, owner=True, reader_index=reader_index)

    def handle(self) -> dict:
        """A msgpack-able description that `attach` / `attach_writer` accept in another process."""
        lay = self._layout
        return {"name": self._shm.name, "n_readers": lay.n_readers,
                "chunk_bytes": lay.chunk_bytes, "n_chunks": lay.n_chunks, "version": _VERSION}

    @classmethod
    def attach(cls, handle: dict, reader_index: int) -> "MessageQueue":
        """Join the ring described by `handle` as reader `reader_index` (0 <= index < n_readers).

        A reader resumes where reader `reader_index` left off, so it sees every message written
        since the queue was created, including those written before it attached.
        """
        if not 0 <= reader_index < int(handle["n_readers"]):
            raise ValueError(f"reader_index {reader_index} out of range for "
                             f"{handle['n_readers']} readers")
        return cls._attach(handle, reader_index)

    @classmethod
    def attach_writer(cls, handle: dict) -> "MessageQueue":
        """Join the ring described by `handle` as its writer (one writer at a time)."""
        return cls._attach(handle, None)

    @classmethod
    def _attach(cls, handle: dict, reader_index: int | None) -> "MessageQueue":
        layout = _Layout(int(handle["n_readers"]), int(handle["chunk_bytes"]), int(handle["n_chunks"]))
        shm = _attach_untracked(str(handle["name"]))
        if shm.size < layout.total_bytes:
            shm.close()
            raise ValueError(f"segment {handle['name']} is smaller than its handle says")
        q = shm.buf[: layout.total_bytes].cast("Q")
        got = (q[_W_MAGIC], q[_W_VERSION], q[_W_READERS], q[_W_CHUNK], q[_W_NCHUNKS])
        q.release()
        want = (_MAGIC, _VERSION, layout.n_readers, layout.chunk_bytes, layout.n_chunks)
        if got != want:
            shm.close()
            raise ValueError(f"segment {handle['name']} header {got} does not match handle {want}")
        return cls(shm, layout, owner=False, reader_index=reader_index)

    def stop(self) -> None:
        """Mark the queue closed: blocked and future waits on any end raise `QueueClosed`.

        Readers still receive messages written before the stop.
        """
        if not self._closed_locally:
            self._q[_W_CLOSED] = 1

    @property
    def stopped(self) -> bool:
        return self._closed_locally or self._q[_W_CLOSED] != 0

    def close(self) -> None:
        """Release this end. The creator also stops the queue and unlinks the segment."""
        if self._closed_locally:
            return
        owner = self._owner and os.getpid() == self._pid
        if owner:
            self.stop()
        self._closed_locally = True
        self._q.release()
        self._buf = None
        self._shm.close()
        if owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass

    def __del__(self) -> None:  # an end dropped without close(): same as close()
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "MessageQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def name(self) -> str:
        return self._shm.name

    @property
    def n_readers(self) -> int:
        return self._layout.n_readers

    # ------------------------------------------------------------------------------- waiting

    def _wait(self, ready: Callable[[], bool], deadline: float | None, what: str,
              check: Callable[[], None] | None = None) -> None:
        """Return once `ready()`; spin briefly, then sleep with growing backoff. `check()` runs every 50 ms while
        blocked: raising from it gives up the wait (e.g. the peer died)."""
        if ready():
            return
        q = self._q
        start = time.perf_counter()
        next_check = start + _CHECK_EVERY_S
        nap = _SLEEP_MIN_S
        while True:
            if ready():
                return
            if q[_W_CLOSED]:
                if ready():  # written just before the stop, after our last look: still delivered
                    return
                raise QueueClosed(f"message queue {self._shm.name} was stopped while {what}")
            now = time.perf_counter()
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"timed out {what} on message queue {self._shm.name}")
            if check is not None and now >= next_check:
                check()
                next_check = time.perf_counter() + _CHECK_EVERY_S
            waited = now - start
            if waited > _SPIN_S:
                time.sleep(nap)
                nap = min(nap * 2, _SLEEP_CAP_S if waited < _IDLE_AFTER_S else _SLEEP_IDLE_CAP_S)
            else:
                os.sched_yield()  # let the peer run if it shares our core

    @staticmethod
    def _deadline(timeout: float | None) -> float | None:
        return None if timeout is None else time.perf_counter() + max(timeout, 0.0)

    # ------------------------------------------------------------------------------- writer

    def enqueue(self, obj: Any, timeout: float | None = None, check: Callable[[], None] | None = None) -> None:
        """Broadcast `obj` (anything `codec.encode` takes) to every reader; blocks while the ring is full.

        Never drops or tears a message: on TimeoutError, `obj` (and any earlier message still
        unsent) stays in this end's backlog and goes out, in order, before the next message or on
        `flush()`. So do not enqueue the same object again after a timeout.

        `check()`, if given, runs every 50 ms while the ring is full; whatever it raises ends the wait the way a
        timeout does (the writer's liveness test of its readers: a dead or stalled reader never frees a chunk).
        """
        if self._reader_index is not None:
            raise RuntimeError("enqueue on a reader end of a MessageQueue")
        if self._closed_locally or self._q[_W_CLOSED]:
            raise QueueClosed(f"message queue {self._shm.name} is stopped")
        self._backlog.append(memoryview(codec.encode(obj)))
        self.flush(timeout, check)

    def flush(self, timeout: float | None = None, check: Callable[[], None] | None = None) -> None:
        """Send the backlog left by enqueues that timed out; TimeoutError leaves the rest queued."""
        deadline = self._deadline(timeout)
        while self._backlog:
            self._send(deadline, check)

    @property
    def backlog(self) -> int:
        """Messages accepted by `enqueue` but not yet fully written to the ring (after a timeout)."""
        return len(self._backlog)

    def _send(self, deadline: float | None, check: Callable[[], None] | None = None) -> None:
        """Write the first backlog message as consecutive chunks, keeping the unsent tail on timeout."""
        lay, q = self._layout, self._q
        data = self._backlog[0]
        pos, size = 0, len(data)
        try:
            while True:
                n = min(size - pos, lay.chunk_bytes)
                seq = self._seq
                need = seq - lay.n_chunks + 1  # every reader must have consumed chunk seq - n_chunks
                if need > self._min_done:
                    self._wait(lambda: self._refresh_min_done() >= need, deadline,
                               "waiting for readers to free a chunk", check)
                slot = seq % lay.n_chunks
                word = lay.chunk_word(slot)
                off = word * 8 + _CHUNK_HEADER_BYTES
                self._buf[off : off + n] = data[pos : pos + n]
                pos += n
                q[word] = n
                q[word + 1] = 1 if pos == size else 0
                q[lay.slot_seq + slot] = seq + 1  # publish: stored after payload and chunk header
                self._seq = seq + 1
                q[_W_WRITTEN] = seq + 1
                if pos == size:
                    self._backlog.popleft()
                    return
        except BaseException:
            if pos:
                self._backlog[0] = data[pos:]  # the head chunks are out; keep only the tail
            raise

    def _refresh_min_done(self) -> int:
        lay, q = self._layout, self._q
        self._min_done = min(q[lay.done + r * _LINE_WORDS] for r in range(lay.n_readers))
        return self._min_done

    # ------------------------------------------------------------------------------- reader

    def dequeue(self, timeout: float | None = None) -> Any:
        """Next message, in write order. Raises TimeoutError after `timeout` seconds (None: wait
        forever; 0: poll once) and QueueClosed once stopped with nothing left to read."""
        if self._reader_index is None:
            raise RuntimeError("dequeue on the writer end of a MessageQueue")
        if self._closed_locally:
            raise QueueClosed(f"message queue {self._shm.name} is closed")
        lay, q = self._layout, self._q
        deadline = self._deadline(timeout)
        done_word = lay.done + self._reader_index * _LINE_WORDS
        while True:
            seq = self._seq
            slot = seq % lay.n_chunks
            seq_word = lay.slot_seq + slot
            if q[seq_word] != seq + 1:
                self._wait(lambda: q[seq_word] == seq + 1, deadline, "waiting for a message")
            word = lay.chunk_word(slot)
            n, last = q[word], q[word + 1]
            off = word * 8 + _CHUNK_HEADER_BYTES
            part = bytes(self._buf[off : off + n])  # copy out before releasing the chunk
            q[done_word] = seq + 1
            self._seq = seq + 1
            if last:
                break
            self._parts.append(part)
        if self._parts:
            self._parts.append(part)
            part = b"".join(self._parts)
            self._parts = []
        return codec.decode(part)
