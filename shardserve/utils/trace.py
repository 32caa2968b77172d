"""Chrome trace events (open in Perfetto / chrome://tracing): one track per rank, spans per micro-batch."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class Tracer:
    """Records complete ('X') events; disabled tracers cost one attribute check per span."""

    def __init__(self, enabled: bool, pid: int, process_name: str) -> None:
        self.enabled = enabled
        self.pid = pid
        self.events: list[dict] = []
        if enabled:
            self.events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": process_name}})

    @contextmanager
    def span(self, name: str, tid: int = 0, **args) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        t0 = time.time()
        try:
            yield
        finally:
            self.events.append({"name": name, "ph": "X", "pid": self.pid, "tid": tid, "ts": t0 * 1e6,
                                "dur": (time.time() - t0) * 1e6, "args": args})


def write_trace(events: list[dict], out: str | Path) -> None:
    """Every rank's events in one Chrome trace file."""
    Path(out).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
