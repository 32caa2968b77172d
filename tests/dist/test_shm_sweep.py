"""The /dev/shm sweep covers the shared-memory all-reduce: its segment names carry the creating pid
(`ssar_{pid}_{random}`, like the rings' `ssmq_` and the heartbeat boards' `sshb_`), so
`reap_orphaned_segments` unlinks one whose creator died (e.g. a rank 0 killed during set-up, before it unlinks the
name) and keeps one whose creator runs. In process, no ranks spawned."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from multiprocessing import resource_tracker, shared_memory
from types import SimpleNamespace

import pytest

from shardserve.distributed import shm_allreduce
from shardserve.distributed.message_queue import OWNED_PREFIXES, owned_segment_name, reap_orphaned_segments

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm to sweep")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_allreduce_segment_of_a_dead_creator_is_swept_and_a_live_ones_kept():
    assert "ssar" in OWNED_PREFIXES
    dead = f"ssar_{_dead_pid()}_{os.urandom(6).hex()}"
    mine = owned_segment_name("ssar")
    assert re.fullmatch(rf"ssar_{os.getpid()}_[0-9a-f]{{12}}", mine) and len(mine) <= 30  # macOS: 31 with the '/'
    segs = [shared_memory.SharedMemory(name=n, create=True, size=64) for n in (dead, mine)]
    try:
        removed = reap_orphaned_segments()
        assert dead in removed and mine not in removed
        assert not os.path.exists(f"/dev/shm/{dead}") and os.path.exists(f"/dev/shm/{mine}")
    finally:
        for seg in segs:
            seg.close()
        segs[1].unlink()
        resource_tracker.unregister(f"/{dead}", "shared_memory")  # the sweep unlinked it behind the tracker's back


def test_sweep_leaves_names_it_does_not_own():
    """Only `{prefix}_{pid}_{hex}` of OWNED_PREFIXES are candidates: a foreign segment with a dead pid stays."""
    foreign = f"ssxx_{_dead_pid()}_{os.urandom(6).hex()}"
    seg = shared_memory.SharedMemory(name=foreign, create=True, size=64)
    try:
        assert foreign not in reap_orphaned_segments()
        assert os.path.exists(f"/dev/shm/{foreign}")
    finally:
        seg.close()
        seg.unlink()


def test_allreduce_names_its_segment_with_its_pid(monkeypatch):
    """`ShmCommunicator.create` (one rank, collectives stubbed) names the segment `ssar_{pid}_...`, which the sweep
    recognises, and unlinks it once set up."""
    names: list[str] = []
    real = shared_memory.SharedMemory

    def recording(name=None, create=False, size=0):
        names.append(name)
        return real(name=name, create=create, size=size)

    monkeypatch.setattr(shm_allreduce, "shared_memory", SimpleNamespace(SharedMemory=recording))
    monkeypatch.setattr(shm_allreduce, "dist", SimpleNamespace(all_reduce=lambda *a, **k: None,
                                                               ReduceOp=SimpleNamespace(MIN=None)))
    group = SimpleNamespace(world_size=1, rank_in_group=0, name="tp", ranks=[0], cpu_group=None, timeout_s=5.0,
                            broadcast_object=lambda obj, src=0: obj)
    comm = shm_allreduce.ShmCommunicator.create(group, slot_bytes=4096)
    try:
        assert comm is not None and len(names) == 1
        assert re.fullmatch(rf"ssar_{os.getpid()}_[0-9a-f]+", names[0])
        assert re.match(rf"^({'|'.join(OWNED_PREFIXES)})_(\d+)_", names[0])
        assert not os.path.exists(f"/dev/shm/{names[0]}")  # unlinked after set-up, as before
    finally:
        if comm is not None:
            comm.close()
