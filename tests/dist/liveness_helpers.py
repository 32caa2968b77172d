"""Functions test_liveness.py runs on ranks by name ("liveness_helpers:NAME", found through PYTHONPATH): each is
called as fn(worker, *args) inside the rank's process."""
from __future__ import annotations

import time


def slow_steps(worker, seconds: float) -> int:
    """Make every later step of this rank take `seconds` more, busy in Python (it holds the GIL but for CPython's
    5 ms switches): the long healthy step that must not be taken for a stall."""
    execute = type(worker).execute

    def slow(sched):
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            n += 1
        return execute(worker, sched)
    worker.execute = slow
    return worker.rank


def normal_steps(worker) -> int:
    worker.__dict__.pop("execute", None)
    return worker.rank


def size_of(worker, blob: str) -> int:
    return len(blob)
