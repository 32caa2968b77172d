"""`GracefulStop` in process, with stand-ins for the server state, the router and uvicorn's server: the first signal
drains (503 for new requests, the stop waits for the requests in flight), the end of the grace period or a second
signal stops the engines at once, a third one also stops uvicorn waiting for connections."""
from __future__ import annotations

import asyncio
import signal
from types import SimpleNamespace

import pytest

from shardserve.entrypoints.openai.graceful_stop import GracefulStop
from shardserve.entrypoints.openai.protocol import APIError
from shardserve.entrypoints.openai.serving import ServerState


class FakeRouter:
    def __init__(self) -> None:
        self.replicas = [SimpleNamespace(num_in_flight=0)]
        self.shutdowns = 0

    async def shutdown(self) -> None:
        self.shutdowns += 1
        self.replicas[0].num_in_flight = 0


def _setup(grace_s: float, in_flight: int = 1):
    router = FakeRouter()
    router.replicas[0].num_in_flight = in_flight
    state = ServerState(router, tokenizer=None, model_names=["m"], model_path="m", max_model_len=16,
                        metrics=None)
    server = SimpleNamespace(should_exit=False, force_exit=False,
                             config=SimpleNamespace(timeout_graceful_shutdown=5))
    return state, router, server, GracefulStop(state, grace_s, server)


def test_first_signal_drains_until_nothing_is_in_flight(capsys):
    async def main():
        state, router, server, stop = _setup(grace_s=30)
        state.check_accepting()  # serving: no error
        stop.on_signal(signal.SIGTERM)
        assert state.draining
        with pytest.raises(APIError) as e:
            state.check_accepting()
        assert e.value.status == 503 and "shutting down" in str(e.value.body())
        await asyncio.sleep(0.2)
        assert not server.should_exit  # the request still runs
        router.replicas[0].num_in_flight = 0
        await asyncio.wait_for(stop._task, 2)
        assert server.should_exit and router.shutdowns == 0 and not server.force_exit
    asyncio.run(main())
    err = capsys.readouterr().err
    assert "SIGTERM: draining" in err and "drained: every request finished" in err


def test_active_http_requests_count_too():
    async def main():
        state, router, server, stop = _setup(grace_s=30, in_flight=0)
        state.active_requests = 1  # e.g. the end of a stream still being written
        stop.on_signal(signal.SIGINT)
        await asyncio.sleep(0.15)
        assert not server.should_exit
        state.active_requests = 0
        await asyncio.wait_for(stop._task, 2)
        assert server.should_exit
    asyncio.run(main())


def test_grace_period_over_stops_the_engines(capsys):
    async def main():
        state, router, server, stop = _setup(grace_s=0.2)
        stop.on_signal(signal.SIGTERM)
        await asyncio.wait_for(stop._task, 2)
        assert router.shutdowns == 1 and server.should_exit and stop.forced
    asyncio.run(main())
    assert "grace period of 0.2 s is over with 1 request(s)" in capsys.readouterr().err


def test_second_signal_stops_at_once_and_a_third_forces_uvicorn(capsys):
    async def main():
        state, router, server, stop = _setup(grace_s=30)
        stop.on_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        stop.on_signal(signal.SIGTERM)
        await asyncio.wait_for(stop._task, 1)
        assert router.shutdowns == 1 and server.should_exit and not server.force_exit
        assert server.config.timeout_graceful_shutdown <= 2
        stop.on_signal(signal.SIGINT)
        assert server.force_exit
    asyncio.run(main())
    err = capsys.readouterr().err
    assert "SIGTERM again: stopping now" in err and "1 request(s) in flight end with an error" in err


def test_nothing_in_flight_stops_at_once():
    async def main():
        state, router, server, stop = _setup(grace_s=30, in_flight=0)
        stop.on_signal(signal.SIGTERM)
        await asyncio.wait_for(stop._task, 1)
        assert server.should_exit and router.shutdowns == 0
    asyncio.run(main())
