"""Liveness apart from steps ("nothing lost, nothing hung"): every rank and every engine core beats from a thread, so
a stopped (SIGSTOP) rank or core fails its requests within the stall timeout, a long healthy step is never taken for
a stall, a killed rank gives one short error line, and nothing is left in /tmp or /dev/shm.

The ring's give-up hook, the orphan sweep, the heartbeat board and the core's heartbeat thread run in process; then
offline tp-2 LLMs (a 3 s step survives a 1.5 s stall timeout, then a rank stopped mid-generate fails it within the
timeout; a 20 MB write through the 8 MiB ring gives up on a stopped rank; a SIGKILLed rank gives one short line and
leaves nothing behind), and a -dp 2 server whose stopped core turns unhealthy and fails its request within the
heartbeat timeout."""
from __future__ import annotations

import asyncio
import glob
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import pytest

from checkpoints import engine_llm
from shardserve import SamplingParams
from shardserve.distributed.heartbeat import HeartbeatBoard
from shardserve.distributed.message_queue import MessageQueue, owned_segment_name, reap_orphaned_segments
from shardserve.executor.base import ExecutorError

HERE = str(Path(__file__).resolve().parent)
E2E = str(Path(__file__).resolve().parents[1] / "e2e")


# --- in process ---------------------------------------------------------------------------------------------------
def test_enqueue_gives_up_through_check():
    """A writer blocked on a reader that never reads (dead or stopped) leaves when its check raises."""
    with MessageQueue.create(n_readers=1, chunk_bytes=64, n_chunks=2) as q:
        reader = MessageQueue.attach(q.handle(), reader_index=0)  # attached, never reads
        start = time.monotonic()

        def check():
            if time.monotonic() - start > 0.3:
                raise RuntimeError("reader 0 is gone")
        with pytest.raises(RuntimeError, match="reader 0 is gone"):
            q.enqueue("x" * 1000, check=check)  # 16 chunks through a 2-chunk ring
        assert time.monotonic() - start < 2.0
        reader.close()


def test_orphaned_segments_are_reaped():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"ssmq_{dead.pid}_{os.urandom(6).hex()}"
    mine = owned_segment_name("ssmq")
    assert mine.startswith(f"ssmq_{os.getpid()}_") and len(mine) <= 30  # macOS: 31 with the leading slash
    segs = [shared_memory.SharedMemory(name=n, create=True, size=64) for n in (name, mine)]
    try:
        removed = reap_orphaned_segments()
        assert name in removed and mine not in removed  # this process still runs
        assert not os.path.exists(f"/dev/shm/{name}") and os.path.exists(f"/dev/shm/{mine}")
    finally:
        for seg in segs:
            seg.close()
        segs[1].unlink()
        resource_tracker.unregister(f"/{name}", "shared_memory")


def test_heartbeat_board_tells_a_silent_rank():
    board = HeartbeatBoard.create(2)
    try:
        assert board.stalled(0.2) is None  # no beat yet: still starting, not stalled
        board.beat(0)
        board.beat(1)
        assert board.stalled(0.2) is None
        for _ in range(8):
            time.sleep(0.1)
            board.beat(0)
            found = board.stalled(0.2)
        assert found is not None and found[0] == 1 and found[1] > 0.2
    finally:
        board.close()


def test_core_heartbeat_thread_speaks_through_a_busy_step():
    """The engine core's heartbeat thread sends `hb` while its main thread is busy in Python (a long step), and
    shares the socket with the main thread's writes without interleaving them."""
    import socket

    from shardserve.distributed import codec
    from shardserve.engine.core_proc import _Channel, start_heartbeat
    a, b = socket.socketpair()
    try:
        chan = _Channel(a)
        start_heartbeat(chan, interval_s=0.05)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # the "step": pure Python, holding the GIL but for the 5 ms switches
            pass
        chan.send({"t": "outs", "outs": ["x" * 100_000]})
        time.sleep(0.2)
        b.settimeout(1.0)
        decoder, msgs = codec.FrameDecoder(), []
        while not any(m.get("t") == "outs" for m in msgs):
            decoder.feed(b.recv(1 << 20))
            msgs.extend(decoder)
        assert sum(m.get("t") == "hb" for m in msgs) >= 10, [m.get("t") for m in msgs]
    finally:
        a.close()
        b.close()


# --- offline tp 2 -------------------------------------------------------------------------------------------------
@pytest.fixture
def rank_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))


def _segments_of(pid: int) -> list[str]:
    return glob.glob(f"/dev/shm/ssmq_{pid}_*") + glob.glob(f"/dev/shm/sshb_{pid}_*")


def _resume(pid: int) -> None:
    """SIGCONT a process a test stopped, if it still exists (cleanup after a SIGSTOP)."""
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _signal_later(pid: int, sig: int, delay: float) -> dict:
    sent: dict = {}

    def fire():
        sent["at"] = time.monotonic()
        os.kill(pid, sig)
    threading.Timer(delay, fire).start()
    return sent


PROMPT = [[5, 17, 42, 7, 99, 3]]
LONG = SamplingParams(max_tokens=60, ignore_eos=True, temperature=0)


@pytest.mark.slow
@pytest.mark.xdist_group("multiproc")
def test_long_step_lives_and_a_stopped_rank_fails_fast(checkpoint, rank_path):
    segments = set(_segments_of(os.getpid()))
    llm = engine_llm(checkpoint("llama"), tensor_parallel_size=2, rank_stall_timeout_s=1.5)
    ex = llm.engine.executor
    stopped = None
    try:
        # a 3 s step (busy in Python on rank 1) under a 1.5 s stall timeout: the heartbeat thread keeps beating
        ex.collective_rpc("liveness_helpers:slow_steps", 3.0, ranks=[1])
        start = time.monotonic()
        out = llm.generate(prompt_token_ids=PROMPT, sampling_params=SamplingParams(max_tokens=1), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 1 and time.monotonic() - start >= 3.0

        # steps of 0.1 s; SIGSTOP rank 1 0.5 s into a 60-token generate: it fails within the timeout, naming rank 1
        ex.collective_rpc("liveness_helpers:slow_steps", 0.1, ranks=[1])
        stopped = ex.procs[1].pid
        sent = _signal_later(stopped, signal.SIGSTOP, 0.5)
        with pytest.raises(RuntimeError) as err:
            llm.generate(prompt_token_ids=PROMPT, sampling_params=LONG, use_tqdm=False)
        waited = time.monotonic() - sent["at"]
        assert 1.0 <= waited <= 3.5, waited  # its last beat was up to 0.5 s before the stop
        msg = str(err.value)
        assert "rank 1 stalled" in msg and len(msg) < 300, msg
        for p in ex.procs:  # the executor killed its ranks, the stopped one too
            p.wait(timeout=5)
    finally:
        if stopped is not None:
            _resume(stopped)
        llm.shutdown()
    assert set(_segments_of(os.getpid())) <= segments


@pytest.mark.slow
@pytest.mark.xdist_group("multiproc")
def test_a_write_larger_than_the_ring_gives_up_on_a_stopped_rank(checkpoint, rank_path):
    """An RPC of 20 MB through the 8 MiB request ring: a stopped reader never frees a chunk; the write gives up."""
    llm = engine_llm(checkpoint("llama"), tensor_parallel_size=2, rank_stall_timeout_s=1.5)
    ex = llm.engine.executor
    stopped = ex.procs[1].pid
    try:
        blob = "x" * (20 << 20)
        assert ex.collective_rpc("liveness_helpers:size_of", blob) == [len(blob)] * 2
        os.kill(stopped, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(ExecutorError, match="rank 1 stalled"):
            ex.collective_rpc("liveness_helpers:size_of", blob)
        assert time.monotonic() - start <= 3.5
        assert ex.requests.backlog  # it left while writing, not after
    finally:
        _resume(stopped)
        llm.shutdown()


@pytest.mark.slow
@pytest.mark.xdist_group("multiproc")
def test_killed_rank_gives_one_short_line_and_leaves_nothing(checkpoint, rank_path):
    before = set(glob.glob("/tmp/shardserve-ranks-*"))
    segments = set(_segments_of(os.getpid()))
    llm = engine_llm(checkpoint("llama"), tensor_parallel_size=2)
    try:
        ex = llm.engine.executor
        ex.collective_rpc("liveness_helpers:slow_steps", 0.1, ranks=[0])
        sent = _signal_later(ex.procs[1].pid, signal.SIGKILL, 0.5)
        with pytest.raises(RuntimeError) as err:
            llm.generate(prompt_token_ids=PROMPT, sampling_params=LONG, use_tqdm=False)
        assert time.monotonic() - sent["at"] < 3.0
        msg = str(err.value)
        assert "rank 1 died (exit code -9)" in msg, msg
        assert len(msg) < 300 and "Traceback" not in msg and ".py" not in msg, msg
    finally:
        llm.shutdown()
    assert set(_segments_of(os.getpid())) <= segments
    assert set(glob.glob("/tmp/shardserve-ranks-*")) <= before


# --- server -dp 2 -------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.xdist_group("multiproc")
def test_stopped_core_turns_unhealthy_and_fails_its_requests(tiny_model, tmp_path):
    sys.path.insert(0, E2E)
    import openai
    from e2e_helpers import MODEL_NAME, ServerProcess, metric_value

    timeout = 3.0
    # --max-migrations 0: its requests fail (the contract without a spare; test_data_parallel.py has them migrate)
    srv = ServerProcess(tiny_model, ["-dp", "2", "--engine-heartbeat-timeout", str(timeout), "--max-migrations", "0"],
                        tmp_path / "server.log")
    stopped = None
    try:
        srv.wait_ready()
        pids = [r["pid"] for r in srv.health().json()["replicas"]]

        async def stream(c, first: asyncio.Event) -> tuple[str, float]:
            s = await c.completions.create(model=MODEL_NAME, prompt="liveness", max_tokens=480, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
            try:
                async for _ in s:
                    first.set()
            except openai.APIError as e:
                return f"error: {e}", time.monotonic()
            return "done", time.monotonic()

        async def main():
            async with openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="unused", timeout=60,
                                          max_retries=0) as c:
                firsts = [asyncio.Event(), asyncio.Event()]
                tasks = [asyncio.create_task(stream(c, f)) for f in firsts]  # least-loaded: one per replica
                for f in firsts:
                    await asyncio.wait_for(f.wait(), 30)
                os.kill(pids[1], signal.SIGSTOP)
                t0 = time.monotonic()
                unhealthy_after = None
                while unhealthy_after is None and time.monotonic() - t0 < timeout + 5:
                    r = (await asyncio.to_thread(srv.health)).json()["replicas"][1]
                    if not r["healthy"]:
                        unhealthy_after = time.monotonic() - t0
                    await asyncio.sleep(0.1)
                done, pending = await asyncio.wait(tasks, timeout=timeout + 5, return_when=asyncio.FIRST_COMPLETED)
                for t in pending:  # the other replica's request goes on; test_data_parallel.py follows such ones
                    t.cancel()
                return unhealthy_after, [(t.result()[0], t.result()[1] - t0) for t in done]

        stopped = pids[1]
        unhealthy_after, results = asyncio.run(main())
        assert unhealthy_after is not None and unhealthy_after <= timeout + 1.0, unhealthy_after
        assert len(results) == 1, results
        (first, after), = results
        assert first.startswith("error") and "replica 1" in first and "heartbeat" in first, results
        assert after <= timeout + 1.5, results  # its request failed within the timeout, not 60 s
        assert srv.health().status_code == 200  # replica 0 still serves
        # the stopped core was killed (a stopped process dies of SIGKILL) and a fresh one is starting
        assert subprocess.run(["ps", "-o", "stat=", "-p", str(pids[1])], capture_output=True).stdout.strip() in \
            (b"", b"Z")
        deadline = time.monotonic() + 60
        while not (srv.health().json()["replicas"][1]["healthy"] and
                   srv.health().json()["replicas"][1]["pid"] not in (pids[1], None)) and time.monotonic() < deadline:
            time.sleep(0.2)
        rep = srv.health().json()["replicas"][1]
        assert rep["healthy"] and rep["pid"] not in (pids[1], None), rep  # healthy again after the recovery
        assert srv.health().json()["healthy"] == 2
        text = srv.metrics()
        assert metric_value(text, "shardserve:request_failure_total", replica="1") == 1
        assert metric_value(text, "shardserve:request_migrations_total", replica="1") == 0
    finally:
        if stopped is not None:
            _resume(stopped)
        srv.stop()
