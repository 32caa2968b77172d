"""Chrome trace events (open in Perfetto / chrome://tracing): one track per rank, spans per micro-batch."""
from __future__ import annotations

import json
import os
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

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.events))


def merge_traces(parts: list[Path], out: str | Path) -> None:
    """Concatenate per-rank event lists into one Chrome trace file and remove the parts."""
    events: list[dict] = []
    for p in parts:
        if p.is_file():
            events.extend(json.loads(p.read_text()))
            os.unlink(p)
    Path(out).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
