"""Shared-memory broadcast ring: ordering, multi-reader processes, big messages, timeouts, stop, cleanup."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import pytest

from shardserve.distributed.message_queue import MessageQueue, QueueClosed

# Children are spawned and import this module: keep torch out of its top level (fast start).
JOIN_TIMEOUT_S = 30.0


def _payload(i: int) -> dict:
    """Message i of a stream; every 17th one spans many chunks (bigger than the whole small ring)."""
    size = 50_000 + i if i % 17 == 0 else i % 300
    return {"i": i, "blob": bytes((i + k) % 251 for k in range(size)), "tag": f"m{i}", "none": None}


def _check(i: int, msg: dict) -> None:
    want = _payload(i)
    if msg != want:
        raise AssertionError(f"message {i}: got i={msg.get('i')} len={len(msg.get('blob', b''))}, "
                             f"want len={len(want['blob'])}")


def _reader_proc(handle: dict, reader_index: int, n_msgs: int, ret_handle: dict) -> None:
    """Spawned reader: check every message in order, then expect QueueClosed; report via msgpack."""
    ret = MessageQueue.attach_writer(ret_handle)
    mq = MessageQueue.attach(handle, reader_index)
    report: dict = {"reader": reader_index, "count": 0, "error": None, "closed": False}
    try:
        for i in range(n_msgs):
            _check(i, mq.dequeue(timeout=JOIN_TIMEOUT_S))
            report["count"] += 1
        try:
            mq.dequeue(timeout=JOIN_TIMEOUT_S)
        except QueueClosed:
            report["closed"] = True
    except Exception as e:  # reported to the parent as data, not as a pickled exception
        report["error"] = f"{type(e).__name__}: {e}"
    finally:
        mq.close()
        ret.enqueue(report, timeout=JOIN_TIMEOUT_S)
        ret.close()


def _echo_proc(in_handle: dict, out_handle: dict) -> None:
    """Spawned echo server for the latency test: returns each message until QueueClosed."""
    src = MessageQueue.attach(in_handle, 0)
    dst = MessageQueue.attach_writer(out_handle)
    try:
        while True:
            dst.enqueue(src.dequeue(timeout=JOIN_TIMEOUT_S))
    except QueueClosed:
        pass
    finally:
        src.close()
        dst.close()


def _join_all(procs: list) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        hung = [p.pid for p in procs if p.is_alive()]
        assert not hung, f"reader processes {hung} did not exit"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


# ------------------------------------------------------------------------------------- in process


def test_in_process_round_trip_in_order():
    import torch

    with MessageQueue.create(n_readers=1, chunk_bytes=1024, n_chunks=4) as w:
        r = MessageQueue.attach(w.handle(), 0)
        try:
            for i in range(50):  # more messages than slots: ring wraps many times
                w.enqueue({"i": i, "t": torch.full((3,), i, dtype=torch.bfloat16), "s": [i, None]})
                out = r.dequeue(timeout=5)
                assert out["i"] == i and out["s"] == [i, None]
                assert torch.equal(out["t"], torch.full((3,), i, dtype=torch.bfloat16))
            for i in range(4):  # fill the ring, then drain
                w.enqueue(i)
            assert [r.dequeue(timeout=5) for _ in range(4)] == [0, 1, 2, 3]
        finally:
            r.close()


def test_reader_attaching_late_sees_earlier_messages():
    with MessageQueue.create(n_readers=2, chunk_bytes=256, n_chunks=4) as w:
        w.enqueue("first")
        w.enqueue({"second": 2})
        readers = [MessageQueue.attach(w.handle(), k) for k in range(2)]
        for r in readers:
            assert r.dequeue(timeout=5) == "first"
            assert r.dequeue(timeout=5) == {"second": 2}
            r.close()


def test_message_bigger_than_whole_ring_with_thread_writer():
    with MessageQueue.create(n_readers=1, chunk_bytes=1000, n_chunks=2) as w:
        r = MessageQueue.attach(w.handle(), 0)
        msgs = [_payload(i) for i in (0, 1, 17, 2, 34)]
        t = threading.Thread(target=lambda: [w.enqueue(m, timeout=10) for m in msgs])
        t.start()
        try:
            for m in msgs:
                assert r.dequeue(timeout=10) == m
        finally:
            t.join(10)
            r.close()
        assert not t.is_alive()


def test_timeouts_raise_and_keep_stream_intact():
    with MessageQueue.create(n_readers=1, chunk_bytes=1000, n_chunks=2) as w:
        r = MessageQueue.attach(w.handle(), 0)
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError):
            r.dequeue(timeout=0.05)
        assert 0.04 < time.perf_counter() - t0 < 2.0
        with pytest.raises(TimeoutError):
            r.dequeue(timeout=0)  # poll

        w.enqueue("a")
        w.enqueue("b")  # ring of 2 chunks is now full
        with pytest.raises(TimeoutError):
            w.enqueue("c", timeout=0.05)
        assert w.backlog == 1  # "c" is kept, not dropped
        big = _payload(17)  # ~50 chunks: times out part-way through
        with pytest.raises(TimeoutError):
            w.enqueue(big, timeout=0.05)
        assert w.backlog == 2
        assert r.dequeue(timeout=1) == "a"
        assert r.dequeue(timeout=1) == "b"
        # Drain with short timeouts on both sides; partial messages survive each timeout.
        got: list = []
        deadline = time.monotonic() + 20
        while len(got) < 2 and time.monotonic() < deadline:
            try:
                w.flush(timeout=0.001)
            except TimeoutError:
                pass
            try:
                got.append(r.dequeue(timeout=0.001))
            except TimeoutError:
                pass
        assert got == ["c", big]
        assert w.backlog == 0
        r.close()


def test_stop_wakes_blocked_reader_and_writer():
    w = MessageQueue.create(n_readers=1, chunk_bytes=128, n_chunks=1)
    r = MessageQueue.attach(w.handle(), 0)
    outcome: list = []

    def blocked_reader():
        try:
            r.dequeue()  # no timeout: only stop() can end this
        except QueueClosed:
            outcome.append("reader closed")

    t = threading.Thread(target=blocked_reader)
    t.start()
    time.sleep(0.05)
    w.stop()
    t.join(5)
    assert outcome == ["reader closed"]
    with pytest.raises(QueueClosed):
        w.enqueue("late")
    r.close()
    w.close()

    # A writer blocked on a full ring is released by a reader-side stop.
    w = MessageQueue.create(n_readers=1, chunk_bytes=128, n_chunks=1)
    r = MessageQueue.attach(w.handle(), 0)
    w.enqueue("fills the ring")
    t = threading.Thread(target=lambda: outcome.append(pytest.raises(QueueClosed, w.enqueue, "x")))
    t.start()
    time.sleep(0.05)
    r.stop()
    t.join(5)
    assert not t.is_alive() and len(outcome) == 2
    assert r.dequeue(timeout=1) == "fills the ring"  # written before the stop: still delivered
    with pytest.raises(QueueClosed):
        r.dequeue(timeout=1)
    r.close()
    w.close()


def test_two_queues_never_collide():
    queues = [MessageQueue.create(n_readers=1, chunk_bytes=256, n_chunks=2) for _ in range(8)]
    try:
        assert len({q.name for q in queues}) == len(queues)
        readers = [MessageQueue.attach(q.handle(), 0) for q in queues]
        for k, q in enumerate(queues):
            q.enqueue({"queue": k})
        assert [r.dequeue(timeout=1) for r in readers] == [{"queue": k} for k in range(8)]
        for r in readers:
            r.close()
    finally:
        for q in queues:
            q.close()


def test_close_unlinks_and_reader_close_does_not():
    w = MessageQueue.create(n_readers=1, chunk_bytes=64, n_chunks=2)
    handle = w.handle()
    r = MessageQueue.attach(handle, 0)
    r.close()  # a reader closing leaves the segment for others
    r2 = MessageQueue.attach(handle, 0)
    r2.close()
    w.close()
    w.close()  # idempotent
    with pytest.raises(FileNotFoundError):
        MessageQueue.attach(handle, 0)
    if os.path.isdir("/dev/shm"):
        assert not os.path.exists(f"/dev/shm/{handle['name']}")

    dropped = MessageQueue.create(n_readers=1, chunk_bytes=64, n_chunks=2)
    handle = dropped.handle()
    del dropped  # garbage-collected owner: closed and unlinked like close()
    with pytest.raises(FileNotFoundError):
        MessageQueue.attach(handle, 0)


def test_bad_arguments():
    with pytest.raises(ValueError):
        MessageQueue.create(n_readers=0)
    with MessageQueue.create(n_readers=2, chunk_bytes=64, n_chunks=2) as w:
        with pytest.raises(ValueError):
            MessageQueue.attach(w.handle(), 2)
        with pytest.raises(ValueError):
            MessageQueue.attach({**w.handle(), "chunk_bytes": 128}, 0)
        with pytest.raises(RuntimeError):
            w.dequeue(timeout=0)


# ------------------------------------------------------------------------------------- processes


@pytest.mark.parametrize("n_readers", [2, 3])
def test_multi_reader_processes(n_readers):
    ctx = mp.get_context("spawn")
    n_msgs = 120
    w = MessageQueue.create(n_readers=n_readers, chunk_bytes=4096, n_chunks=4)
    # Each reader's report comes back on its own queue (reader writes, the test process owns it).
    rets = [MessageQueue.create(n_readers=1, chunk_bytes=1024, n_chunks=2, reader_index=0)
            for _ in range(n_readers)]
    procs = [ctx.Process(target=_reader_proc, args=(w.handle(), k, n_msgs, rets[k].handle()))
             for k in range(n_readers)]
    try:
        for p in procs:
            p.start()
        for i in range(n_msgs):
            w.enqueue(_payload(i), timeout=JOIN_TIMEOUT_S)
        w.stop()  # readers drain everything, then see QueueClosed
        reports = [ret.dequeue(timeout=JOIN_TIMEOUT_S) for ret in rets]
        _join_all(procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        w.close()
        for ret in rets:
            ret.close()
    for k, rep in enumerate(reports):
        assert rep == {"reader": k, "count": n_msgs, "error": None, "closed": True}
    assert all(p.exitcode == 0 for p in procs)


def test_cross_process_latency_small_message(capsys):
    """Round trip of a 1 KiB message through two queues (engine -> worker -> engine)."""
    ctx = mp.get_context("spawn")
    to_worker = MessageQueue.create(n_readers=1, chunk_bytes=4096, n_chunks=4)
    from_worker = MessageQueue.create(n_readers=1, chunk_bytes=4096, n_chunks=4, reader_index=0)
    p = ctx.Process(target=_echo_proc, args=(to_worker.handle(), from_worker.handle()))
    try:
        p.start()
        msg = b"x" * 1024
        to_worker.enqueue(msg)
        assert from_worker.dequeue(timeout=JOIN_TIMEOUT_S) == msg  # worker is up
        times = []
        for _ in range(300):
            t0 = time.perf_counter()
            to_worker.enqueue(msg)
            from_worker.dequeue(timeout=5)
            times.append(time.perf_counter() - t0)
        to_worker.stop()
        _join_all([p])
    finally:
        if p.is_alive():
            p.kill()
        to_worker.close()
        from_worker.close()
    times.sort()
    p50, p99 = times[len(times) // 2], times[int(len(times) * 0.99)]
    with capsys.disabled():
        print(f"\n[message_queue] 1 KiB round trip: p50 {p50 * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us")
    assert p50 < 5e-3  # loose: catches a missed wake-up, not a benchmark
