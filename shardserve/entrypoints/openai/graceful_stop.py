"""How `shardserve serve` stops: `GracefulStop` (the first SIGTERM/SIGINT drains, a second one or the end of
--shutdown-grace-s stops at once) and the middleware that counts the generation requests a drain waits for."""
from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shardserve.entrypoints.openai.serving import ServerState

__all__ = ["GENERATION_PATHS", "CountGenerationRequests", "GracefulStop", "say"]


GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def say(msg: str) -> None:
    """One line on stderr, like the start-up line (the default log level is WARNING)."""
    print(f"shardserve: {msg}", file=sys.stderr, flush=True)


class CountGenerationRequests:
    """ASGI middleware: counts the generation requests (completions, chat) in `state.active_requests` from their
    arrival until their response, streamed or not, is done; the graceful stop waits for the count to reach 0."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        self.state.active_requests += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.active_requests -= 1


class GracefulStop:
    """How `shardserve serve` stops.

    First SIGTERM or SIGINT: *drain* — `state.draining` makes new generation requests 503 and /health 503
    "draining"; the listener stays open (so clients get a clear 503, not a refused connection) and the requests
    already admitted, streams included, run to their end. Once none is left the server stops: uvicorn closes the
    listener and idle connections, and the lifespan's end stops the engine replicas. A second SIGTERM/SIGINT, or
    `grace_s` seconds without the drain finishing, stops at once: the engines are stopped first, so every request
    still running ends with an error (503; a stream gets an error event, then [DONE]), then the server stops as
    above. A third signal also stops uvicorn waiting for connections to close. One line on stderr per phase.

    Its methods run on the event loop (signals arrive through `loop.add_signal_handler`)."""

    def __init__(self, state: ServerState, grace_s: float, server: Any) -> None:
        self.state, self.grace_s, self.server = state, grace_s, server
        self.signals = 0
        self.forced = False
        self._force: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def on_signal(self, sig: int) -> None:
        self.signals += 1
        name = signal.Signals(sig).name
        if self.signals == 1:
            self.begin(name)
        elif self.signals == 2:
            say(f"{name} again: stopping now")
            self.forced = True
            if self._force is not None:
                self._force.set()
        else:
            self.server.force_exit = True  # uvicorn stops waiting for connections too

    def begin(self, why: str) -> None:
        self.state.draining = True
        self._force = asyncio.Event()
        n = self.state.in_flight
        say(f"{why}: draining: new requests get 503, waiting up to {self.grace_s:g} s (--shutdown-grace-s) for "
             f"{n} request(s) in flight; send the signal again to stop at once")
        self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        assert self._force is not None
        while self.state.in_flight and not self._force.is_set():
            left = deadline - loop.time()
            if left <= 0:
                say(f"the grace period of {self.grace_s:g} s is over with {self.state.in_flight} request(s) in "
                     "flight: stopping now")
                self.forced = True
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._force.wait(), min(0.05, left))
        if self.forced and self.state.in_flight:
            say(f"stopping the engine replicas: {self.state.in_flight} request(s) in flight end with an error")
            self.server.config.timeout_graceful_shutdown = 2  # the ended responses only need writing out
            await self.state.router.shutdown()  # every request still running ends with an error now
        elif not self.forced:
            say("drained: every request finished; stopping")
        self.server.should_exit = True
