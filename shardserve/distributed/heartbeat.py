"""Rank liveness apart from steps: one tiny shared-memory segment per engine, one slot per rank.

The executor creates the segment (`HeartbeatBoard.create`, named `sshb_{pid}_{random}`, unlinked by it); every rank
attaches it and starts `beat_forever` in a daemon thread, which stores a counter and the CLOCK_MONOTONIC time (ns,
system-wide on Linux, so comparable between processes) in the rank's slot every `HEARTBEAT_INTERVAL_S`. A long step
does not stop the thread (torch releases the GIL, and CPython switches threads every 5 ms anyway); a stopped
(SIGSTOP) or frozen process stops it. The executor reads the board in each of its waits (`stalled`).

Slot layout: two native u64 words per rank, padded to a 64-byte line: beats, time of the last beat (ns).
"""
from __future__ import annotations

import threading
import time
from multiprocessing import shared_memory

from shardserve.distributed.message_queue import _attach_untracked, owned_segment_name

__all__ = ["HEARTBEAT_INTERVAL_S", "HeartbeatBoard", "start_heartbeat"]

HEARTBEAT_INTERVAL_S = 0.5
_SLOT_WORDS = 8  # one 64-byte line per rank


class HeartbeatBoard:
    def __init__(self, shm: shared_memory.SharedMemory, n: int, owner: bool) -> None:
        self._shm, self.n, self._owner = shm, n, owner
        self._q = shm.buf[: n * _SLOT_WORDS * 8].cast("Q")
        # executor side: per rank, the beat count last seen and when (monotonic s) it was first seen
        self._seen: list[tuple[int, float]] = [(-1, 0.0)] * n

    @classmethod
    def create(cls, n: int) -> "HeartbeatBoard":
        shm = shared_memory.SharedMemory(name=owned_segment_name("sshb"), create=True, size=n * _SLOT_WORDS * 8)
        board = cls(shm, n, owner=True)
        for i in range(n * _SLOT_WORDS):
            board._q[i] = 0
        return board

    @classmethod
    def attach(cls, name: str, n: int) -> "HeartbeatBoard":
        return cls(_attach_untracked(name), n, owner=False)

    @property
    def name(self) -> str:
        return self._shm.name

    def beat(self, rank: int) -> None:
        w = rank * _SLOT_WORDS
        self._q[w + 1] = time.monotonic_ns()
        self._q[w] = self._q[w] + 1

    def last_beat_age(self, rank: int) -> float | None:
        """Seconds since `rank` last beat; None before its first beat (it is still importing)."""
        ts = self._q[rank * _SLOT_WORDS + 1]
        return None if ts == 0 else max(0.0, (time.monotonic_ns() - ts) / 1e9)

    def stalled(self, timeout_s: float) -> tuple[int, float] | None:
        """(rank, seconds since its last beat) of the first rank silent for more than `timeout_s`, else None.

        A rank counts as stalled only once this process has also watched its beat count stand still for a
        while (half the timeout, at most 1 s): when the whole process group was stopped and resumed (Ctrl-Z, fg),
        the ranks' threads beat again within an interval, so they are not taken for stalled."""
        now = time.monotonic()
        grace = min(1.0, timeout_s / 2)
        found = None
        for rank in range(self.n):
            count = self._q[rank * _SLOT_WORDS]
            last, since = self._seen[rank]
            if count != last:
                self._seen[rank] = (count, now)
                continue
            age = self.last_beat_age(rank)
            if found is None and age is not None and age > timeout_s and now - since >= grace:
                found = (rank, age)
        return found

    def close(self) -> None:
        if self._q is None:
            return
        self._q.release()
        self._q = None
        self._shm.close()
        if self._owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass


def start_heartbeat(name: str, n: int, rank: int, interval_s: float = HEARTBEAT_INTERVAL_S) -> HeartbeatBoard:
    """Attach the board and beat for `rank` from a daemon thread for the life of the process (rank side)."""
    board = HeartbeatBoard.attach(name, n)
    board.beat(rank)

    def beat_forever() -> None:
        while True:
            time.sleep(interval_s)
            try:
                board.beat(rank)
            except Exception:  # the board was closed at exit
                return

    threading.Thread(target=beat_forever, name="shardserve-heartbeat", daemon=True).start()
    return board
