"""The DP router's policy and supervision with fake replicas (no processes): least-loaded choice, failover before a
request is accepted, 429 on a full queue, restart of a dead replica; and the merging of queued stream outputs."""
from __future__ import annotations

import asyncio

import pytest

import shardserve.entrypoints.router as router_mod
from shardserve.engine.args import EngineArgs
from shardserve.engine.request_stream import EngineUnavailable, RequestState, RequestStream, _merge
from shardserve.entrypoints.router import QueueFull, ReplicaLoad, Router, pick_replica
from shardserve.outputs import CompletionOutput, RequestOutput
from shardserve.sampling_params import SamplingParams


def L(healthy=True, tokens=0, inflight=0) -> ReplicaLoad:
    return ReplicaLoad(healthy, tokens, inflight)


def test_pick_replica():
    assert pick_replica([L(tokens=50), L(tokens=10), L(tokens=30)]) == 1
    assert pick_replica([L(tokens=10, inflight=3), L(tokens=10, inflight=1)]) == 1  # tie: fewer requests
    assert pick_replica([L(tokens=5), L(tokens=5)]) == 0                             # tie: lowest index
    assert pick_replica([L(healthy=False, tokens=0), L(tokens=99)]) == 1            # never an unhealthy one
    assert pick_replica([L(tokens=0), L(tokens=9)], exclude={0}) == 1
    assert pick_replica([L(healthy=False), L(healthy=False)]) is None
    assert pick_replica([]) is None


class FakeEngine:
    """Stands in for EngineCoreClient: tracks outstanding tokens; can be told to die."""

    def __init__(self, replica: int, on_exit, fail_start: int = 0) -> None:
        self.replica, self.on_exit = replica, on_exit
        self.state, self.reqs, self.fail_start = "new", {}, fail_start
        self.refuse = False
        self.pid = 1000 + replica

    @property
    def healthy(self) -> bool:
        return self.state == "ready"

    num_in_flight = property(lambda self: len(self.reqs))
    num_waiting = property(lambda self: sum(1 for r in self.reqs.values() if not r["started"]))
    outstanding_tokens = property(lambda self: sum(r["tokens"] for r in self.reqs.values()))

    async def start(self) -> None:
        if self.fail_start:
            raise EngineUnavailable("boom")
        self.state = "ready"

    async def add_request(self, rid, ids, params, prompt=None, arrival=None, progress=None):
        if self.refuse or self.state != "ready":
            raise EngineUnavailable(f"replica {self.replica} is not serving")
        self.reqs[rid] = {"tokens": len(ids) + params.max_tokens, "started": False}
        return rid

    def die(self) -> None:
        self.state = "dead"
        self.reqs.clear()
        self.on_exit(self)

    async def shutdown(self) -> None:
        self.state = "stopped"


class FakeRouter(Router):
    def __init__(self, dp: int, **kw) -> None:
        self.made: list[FakeEngine] = []
        super().__init__(EngineArgs(data_parallel_size=dp), "model", 512, **kw)

    def _new_client(self, i: int) -> FakeEngine:  # type: ignore[override]
        e = FakeEngine(i, self._on_exit)
        self.made.append(e)
        return e


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


P = SamplingParams(max_tokens=10)


def test_router_spreads_by_outstanding_tokens():
    async def main():
        r = FakeRouter(2)
        await r.start()
        await r.add_request("a", [1] * 100, P)   # → 0 (110 tokens)
        await r.add_request("b", [1] * 5, P)     # → 1 (15)
        await r.add_request("c", [1] * 5, P)     # → 1 (30 < 110)
        return [sorted(e.reqs) for e in r.replicas]
    assert run(main()) == [["a"], ["b", "c"]]


def test_router_queue_full_and_failover():
    async def main():
        r = FakeRouter(2, max_waiting_requests=2)
        await r.start()
        await r.add_request("a", [1], P)
        await r.add_request("b", [1], P)
        with pytest.raises(QueueFull, match="max-waiting-requests 2"):
            await r.add_request("c", [1], P)
        for e in r.replicas:
            for v in e.reqs.values():
                v["started"] = True  # first tokens out: no longer waiting
        r.replicas[0].refuse = True  # died between the choice and the add: the other replica takes it
        await r.add_request("d", [1], P)
        assert "d" in r.replicas[1].reqs
        r.replicas[1].refuse = True
        with pytest.raises(EngineUnavailable, match="no engine replica"):
            await r.add_request("e", [1], P)
    run(main())


def test_router_restarts_a_dead_replica(monkeypatch):
    monkeypatch.setattr(router_mod, "RESTART_BACKOFF_S", (0.0,))

    async def main():
        r = FakeRouter(2)
        await r.start()
        first = r.replicas[1]
        first.die()
        assert r.num_healthy == 1 and r.replicas[1] is first  # not yet replaced
        await r.add_request("x", [1], P)  # served by the survivor meanwhile
        for _ in range(100):
            await asyncio.sleep(0.01)
            if r.replicas[1] is not first and r.replicas[1].healthy:
                break
        assert r.replicas[1] is not first and r.replicas[1].healthy and r.restarts == [0, 1]
        assert [s["restarts"] for s in r.status()] == [0, 1]
        await r.shutdown()
        assert all(e.state == "stopped" for e in r.replicas)
    run(main())


def test_router_start_failure_raises():
    class Bad(FakeRouter):
        def _new_client(self, i):
            e = FakeEngine(i, self._on_exit, fail_start=int(i == 1))
            return e

    async def main():
        r = Bad(2)
        with pytest.raises(EngineUnavailable, match="boom"):
            await r.start()
        assert not r.started
    run(main())


def _out(text: str, ids: list[int], finished: bool = False) -> RequestOutput:
    c = CompletionOutput(0, text, ids, None, "length" if finished else None, None, text[-1:], ids[-1:], [])
    return RequestOutput("r", None, [1], [c], finished)


def test_stream_merges_queued_outputs_and_raises_errors():
    class Eng:
        replica = 0
        aborted: list[str] = []

        def abort(self, rid):
            self.aborted.append(rid)

    async def main():
        loop = asyncio.get_running_loop()
        req = RequestState(asyncio.Queue(), 1, 3, 1, 0.0, loop.create_future())
        eng = Eng()
        s = RequestStream("r", eng, req)  # type: ignore[arg-type]
        for k in range(1, 3):
            req.queue.put_nowait(_out("abc"[:k], [1, 2, 3][:k]))
        merged = await s.__anext__()  # both queued outputs in one
        assert merged.outputs[0].text == "ab" and merged.outputs[0].text_delta == "ab"
        assert merged.outputs[0].token_ids_delta == [1, 2]
        s.close()
        assert eng.aborted == ["r"]  # unfinished when closed: aborted in the engine
        with pytest.raises(StopAsyncIteration):
            await s.__anext__()
        req2 = RequestState(asyncio.Queue(), 1, 3, 1, 0.0, loop.create_future())
        s2 = RequestStream("r2", eng, req2)  # type: ignore[arg-type]
        req2.queue.put_nowait(_out("a", [1]))
        req2.queue.put_nowait(EngineUnavailable("replica 0 died"))
        assert (await s2.__anext__()).outputs[0].text == "a"  # what came before the error is delivered first
        with pytest.raises(EngineUnavailable):
            await s2.__anext__()
        s2.close()
        assert eng.aborted == ["r"]  # the engine already dropped a failed request: nothing to abort
    run(main())


def test_merge_keeps_indices_of_both():
    a = RequestOutput("r", None, [1], [CompletionOutput(0, "x", [1], text_delta="x", token_ids_delta=[1]),
                                       CompletionOutput(1, "y", [2], text_delta="y", token_ids_delta=[2])], False)
    b = RequestOutput("r", None, [1], [CompletionOutput(0, "xz", [1, 3], text_delta="z", token_ids_delta=[3])], False)
    m = _merge(a, b)
    assert [(c.index, c.text_delta, c.token_ids_delta) for c in m.outputs] == [(0, "xz", [1, 3]), (1, "y", [2])]


def test_gpu_replicas_get_disjoint_gpus():
    """Each data-parallel replica of a GPU engine sees only its own tp x pp GPUs (CUDA_VISIBLE_DEVICES)."""
    import pytest

    from shardserve.config import ConfigError
    from shardserve.engine.core_launch import replica_gpus
    visible = ["0", "1", "2", "3", "5"]
    assert [replica_gpus("cuda", 2, r, visible) for r in (0, 1)] == ["0,1", "2,3"]
    assert [replica_gpus("cuda", 1, r, visible) for r in range(5)] == ["0", "1", "2", "3", "5"]
    assert replica_gpus("cpu", 2, 3, []) is None
    with pytest.raises(ConfigError, match="replica 2 needs GPUs 4..5 .* but 5 are visible"):
        replica_gpus("cuda", 2, 2, visible)


def test_offline_dp_and_server_drive_the_same_engine_core_client(tiny_model, monkeypatch):
    """LLM(data_parallel_size=N) and the API server's Router both drive EngineCoreClient (one handshake, one
    protocol). Cores are faked (no process): bad prompts still raise at add time, and a request the client cannot
    send ends in an error output from step()."""
    from shardserve.engine.core_client import EngineCoreClient
    from shardserve.entrypoints.dp_offline import DataParallelEngines

    async def fake_start(self, timeout: float = 0.0) -> None:
        self.state = "ready"  # no process and no channel: add_request raises EngineUnavailable
    monkeypatch.setattr(EngineCoreClient, "start", fake_start)
    assert type(Router(EngineArgs(data_parallel_size=2), "model", 512)._new_client(0)) is EngineCoreClient
    dp = DataParallelEngines(EngineArgs(model=str(tiny_model), device="cpu", max_model_len=64,
                                        data_parallel_size=2), progress=False)
    try:
        assert len(dp.cores) == 2 and all(type(c) is EngineCoreClient for c in dp.cores)
        assert [c.replica for c in dp.cores] == [0, 1]
        with pytest.raises(ValueError, match="context length"):
            dp.add_request("long", prompt_token_ids=[5] * 100, params=SamplingParams(max_tokens=4))
        with pytest.raises(ValueError, match="either prompt"):
            dp.add_request("none")
        dp.add_request("a", prompt_token_ids=[5, 6], params=SamplingParams(max_tokens=4, n=2))
        with pytest.raises(ValueError, match="already in use"):
            dp.add_request("a", prompt_token_ids=[5, 6])
        outs = []
        for _ in range(100):
            outs += dp.step()
            if not dp.has_unfinished_requests():
                break
        assert [o.request_id for o in outs] == ["a"] and outs[0].finished and "not serving" in outs[0].error
        assert [c.finish_reason for c in outs[0].outputs] == ["error", "error"]
        assert dp.requests_per_replica == [1, 0]
        dp.add_request("b", prompt_token_ids=[5])
        dp.abort_request("b")
        assert not dp.has_unfinished_requests() and dp.step() == []
    finally:
        dp.shutdown()
    dp.shutdown()  # idempotent


# --- request migration ------------------------------------------------------------------------------------------
class FakeStream:
    """A replica's stream: yields the given outputs, then raises `then` (if any)."""

    def __init__(self, rid: str, replica: int, outs: list[RequestOutput], then: BaseException | None = None):
        self.request_id, self.replica, self._outs, self._then = rid, replica, list(outs), then
        self.closed = False

    async def __anext__(self) -> RequestOutput:
        if self._outs:
            return self._outs.pop(0)
        if self._then is not None:
            raise self._then
        raise StopAsyncIteration

    def close(self) -> None:
        self.closed = True


def _progress_out(ids: list[int], text: str, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", None, [1, 2], [CompletionOutput(0, text, ids, logprobs=[{t: -0.5} for t in ids])],
                         finished)


def test_a_lost_replica_s_request_moves_with_what_the_client_has():
    from shardserve.engine.request_stream import ReplicaLost
    from shardserve.entrypoints.request_migration import MigratingStream
    placed, events = [], []
    lost = ReplicaLost("replica 0 died")

    async def place(rid, ids, params, prompt, arrival, progress, exclude):
        placed.append((rid, ids, progress, set(exclude)))
        if len(placed) == 1:  # the first move: another replica that dies too
            return FakeStream(rid, 1, [_progress_out([5, 6, 7], "abc")], then=ReplicaLost("replica 1 died"))
        return FakeStream(rid, 0, [_progress_out([5, 6, 7, 8], "abcd", finished=True)])

    async def main(max_migrations):
        placed.clear()
        first = FakeStream("r", 0, [_progress_out([5], "a"), _progress_out([5, 6], "ab")], then=lost)
        s = MigratingStream(place, first, [1, 2], SamplingParams(max_tokens=4, logprobs=1), None, 0.0,
                            max_migrations, lambda src, dst, arrival: events.append((src, dst)))
        got = []
        try:
            async for o in s:
                got.append(o.outputs[0].text)
        except ReplicaLost as e:
            return got, e, s.migrations
        return got, None, s.migrations

    got, err, moves = asyncio.run(main(2))
    assert got == ["a", "ab", "abc", "abcd"] and err is None and moves == 2
    assert events == [(0, 1), (1, 0)]
    (_, ids0, p0, ex0), (_, _, p1, ex1) = placed
    assert ids0 == [1, 2] and ex0 == {0} and ex1 == {1}
    assert p0.token_ids == [[5, 6]] and p0.texts == ["ab"] and p0.logprobs == [[{5: -0.5}, {6: -0.5}]]
    assert p1.token_ids == [[5, 6, 7]] and p1.texts == ["abc"]

    events.clear()
    got, err, moves = asyncio.run(main(1))  # the limit: the second loss reaches the client
    assert got == ["a", "ab", "abc"] and "replica 1 died" in str(err) and moves == 1
    assert events == [(0, 1), (1, None)]  # counted as a failure of replica 1

    events.clear()
    got, err, moves = asyncio.run(main(0))  # migration off
    assert got == ["a", "ab"] and err is lost and moves == 0 and events == [(0, None)]


def test_a_request_with_nowhere_to_go_fails_with_the_replica_s_error():
    from shardserve.engine.request_stream import ReplicaLost
    from shardserve.entrypoints.request_migration import MigratingStream
    lost = ReplicaLost("replica 0 died")

    async def place(*_args):
        raise EngineUnavailable("no engine replica is serving")

    async def main():
        s = MigratingStream(place, FakeStream("r", 0, [], then=lost), [1], SamplingParams(), None, 0.0, 2)
        with pytest.raises(ReplicaLost, match="replica 0 died"):
            await s.__anext__()
        closed = FakeStream("r", 0, [], then=ReplicaLost("x"))
        s2 = MigratingStream(place, closed, [1], SamplingParams(), None, 0.0, 2)
        s2.close()  # the client went away: never moved
        assert closed.closed
        with pytest.raises(ReplicaLost):
            await s2.__anext__()
    asyncio.run(main())


def test_router_accounting_does_not_grow_with_requests_in_flight():
    """Row 1 of issue 14: the load figures the router reads per request are counters, not sums over requests."""
    from shardserve.engine.core_client import EngineCoreClient
    c = EngineCoreClient({"max_model_len": 64})
    loop = asyncio.new_event_loop()
    try:
        for i in range(3):
            c._track(f"r{i}", RequestState(asyncio.Queue(), 10, 5, 1, 0.0, loop.create_future()))
        assert (c.num_waiting, c.outstanding_tokens, c.num_in_flight) == (3, 45, 3)
        req = c._untrack("r1")
        req.first_token_time, req.generated = 1.0, 2
        c._track("r1", req)
        assert (c.num_waiting, c.outstanding_tokens) == (2, 33)
        c.abort("r0")
        assert (c.num_waiting, c.outstanding_tokens, c.num_in_flight) == (1, 18, 2)
        c._fail_all("gone")
        assert (c.num_waiting, c.outstanding_tokens, c.num_in_flight) == (0, 0, 0)
    finally:
        loop.close()
