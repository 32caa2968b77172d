"""EngineCoreClient: the asyncio client of one engine-core process (the API server's and offline DP's alike).

It launches the core and does the handshake, reads its messages in a background task, gives every request its own
output stream, and aborts in the core a request whose consumer goes away.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import subprocess
import time
from typing import TYPE_CHECKING, Any, Callable

from shardserve.distributed import codec
from shardserve.engine.core_launch import launch_core
from shardserve.engine.output_wire import OutputAccumulator, OutputDelta
from shardserve.engine.request_stream import (EngineUnavailable, Progress, ReplicaLost, RequestRejected,
                                              RequestState, RequestStream)
from shardserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from shardserve.metrics import ServerMetrics

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0
HEARTBEAT_TIMEOUT_S = 10.0   # a core whose heartbeat thread is silent this long is taken for stalled and killed
DEAD_EXIT_GRACE_S = 10.0     # a core that reported `dead` gets this long to stop its ranks and free its segments


def tokens_match(expected: str, got: Any) -> bool:
    """Constant-time comparison of the hello's token with ours."""
    return isinstance(got, str) and hmac.compare_digest(expected.encode(), got.encode())


class EngineCoreClient:
    """The client of one engine-core process (one replica): the process, the channel to it, and the streams of the
    requests it holds. The API server's Router and the offline DataParallelEngines both drive these.

    `metrics` (optional) receives per-replica events (see shardserve.metrics.ServerMetrics); `on_exit(client)`
    is called once when a ready core dies or hangs (the router restarts it).
    """

    def __init__(self, engine_args: dict[str, Any], replica: int = 0, threads: int = 1,
                 metrics: ServerMetrics | None = None, on_exit: Callable[[EngineCoreClient], None] | None = None,
                 heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S) -> None:
        self.engine_args = engine_args
        self.replica = replica
        self.threads = threads
        self.metrics = metrics
        self.on_exit = on_exit
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.state = "new"                   # new → starting → ready → dead | stopped
        self.dead_reason: str | None = None
        self.proc: subprocess.Popen | None = None
        self.stats: dict[str, float] = {}
        self.num_blocks = 0
        self._reqs: dict[str, RequestState] = {}
        self._num_waiting = 0        # requests without their first token yet, kept as they change (O(1) reads)
        self._outstanding = 0        # the sum of their outstanding_tokens, likewise
        self._acc = OutputAccumulator()
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task] = []
        self._last_msg = time.monotonic()   # when the core was last heard from (heartbeats included)

    # --- life cycle ----------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def silent_s(self) -> float:
        """Seconds since the core was last heard from; its heartbeat thread speaks every 0.5 s, steps or not."""
        return time.monotonic() - self._last_msg

    @property
    def stalled(self) -> bool:
        return self.state == "ready" and self.silent_s > self.heartbeat_timeout_s

    @property
    def healthy(self) -> bool:
        """Ready, its process still runs and its heartbeat is fresh (a core killed or stopped a moment ago is not
        chosen before the watchdog says so)."""
        return self.state == "ready" and (self.proc is None or self.proc.poll() is None) and not self.stalled

    async def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Launch the core and wait until its engine is ready (raises EngineUnavailable with the core's reason)."""
        self.state = "starting"
        token = secrets.token_hex(16)
        connected: asyncio.Future = asyncio.get_running_loop().create_future()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            decoder = codec.FrameDecoder(max_frame_bytes=1 << 16)  # until the hello: a stranger gets little
            try:
                while True:  # the first message must be a hello with our token
                    msgs = list(decoder)
                    if msgs:
                        break
                    data = await asyncio.wait_for(reader.read(1 << 16), 10)
                    if not data:
                        raise ConnectionError("closed")
                    decoder.feed(data)
            except (Exception, asyncio.CancelledError):
                writer.close()
                return
            decoder.max_frame_bytes = 1 << 30
            hello = msgs[0]
            if connected.done() or not isinstance(hello, dict) or hello.get("t") != "hello" \
                    or not tokens_match(token, hello.get("token")):
                writer.close()  # a stranger on our port
                return
            connected.set_result((reader, writer, decoder, msgs[1:]))

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        self.proc = launch_core(self.engine_args, self.replica, port, token, self.threads)
        try:
            reader, writer, decoder, early = await self._wait(connected, timeout, "connect")
            self._writer = writer
            ready = await self._wait(asyncio.ensure_future(self._read_until_ready(reader, decoder, early)),
                                     timeout, "load the model")
        except BaseException:
            self._kill()
            self.state = "dead"
            raise
        finally:
            server.close()
        self.num_blocks = int(ready.get("num_blocks", 0))
        self.state = "ready"
        self._last_msg = time.monotonic()
        self._tasks = [asyncio.create_task(self._read_loop(reader, decoder)),
                       asyncio.create_task(self._watchdog())]
        logger.info("replica %d ready (pid %d, %d KV blocks)", self.replica, self.proc.pid, self.num_blocks)

    async def _wait(self, fut: asyncio.Future, timeout: float, what: str):
        """Await `fut`, failing early if the core process exits."""
        deadline = time.monotonic() + timeout
        while True:
            done, _ = await asyncio.wait({fut}, timeout=0.2)
            if done:
                return fut.result()
            code = self.proc.poll() if self.proc else None
            if code is not None or time.monotonic() > deadline:
                fut.cancel()
                why = f"exited with code {code}" if code is not None else f"did not {what} within {timeout:.0f} s"
                raise EngineUnavailable(f"engine core {self.replica} {why} before it was ready")

    async def _read_until_ready(self, reader: asyncio.StreamReader, decoder: codec.FrameDecoder,
                                early: list[dict]) -> dict:
        pending = list(early)
        while True:
            for msg in pending:
                if isinstance(msg, codec.BadFrame):
                    raise EngineUnavailable(f"engine core {self.replica} sent a message that did not decode: "
                                            f"{msg.error}")
                if msg.get("t") == "ready":
                    return msg
                if msg.get("t") == "failed":
                    raise EngineUnavailable(f"engine core {self.replica} failed to start: {msg.get('error')}")
            data = await reader.read(1 << 16)
            if not data:
                raise EngineUnavailable(f"engine core {self.replica} closed its channel during start-up")
            decoder.feed(data)
            pending = list(decoder)

    async def shutdown(self) -> None:
        if self.state in ("stopped",):
            return
        was = self.state
        self.state = "stopped"
        for t in self._tasks:
            t.cancel()
        self._fail_all(f"the server is shutting down; replica {self.replica} stopped")
        if was == "ready" and self._writer is not None:
            try:
                self._writer.write(codec.encode_frame({"t": "shutdown"}))
                await asyncio.wait_for(self._writer.drain(), 1.0)
            except Exception:
                pass
        if self.proc is not None:
            deadline = time.monotonic() + (10.0 if was == "ready" else 0.0)  # a core still starting is just killed
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            self._kill()
        if self._writer is not None:
            self._writer.close()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def _died(self, reason: str, exit_grace_s: float = 0.0) -> None:
        """Fail every request at once; then kill the process (after `exit_grace_s`, for a core that is exiting by
        itself and should clean up first), and report the exit (the router restarts the replica)."""
        if self.state != "ready":
            return
        self.state = "dead"
        self.dead_reason = reason
        logger.error("replica %d (pid %s) died: %s", self.replica, self.pid, reason)
        self._fail_all(f"replica {self.replica} died while running this request ({reason}); "
                       "the request was not completed, please retry it", lost=True)
        for t in self._tasks:
            if t is not asyncio.current_task():
                t.cancel()
        if self.metrics is not None:
            self.metrics.on_replica_down(self.replica)
        if exit_grace_s > 0 and self.proc is not None and self.proc.poll() is None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._reap(exit_grace_s)))
            return
        self._reaped()

    async def _reap(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        try:
            while self.proc is not None and self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            self._reaped()

    def _reaped(self) -> None:
        self._kill()
        if self._writer is not None:
            self._writer.close()
        if self.on_exit is not None:
            self.on_exit(self)

    def _fail_all(self, message: str, lost: bool = False) -> None:
        """Fail every request held here: with ReplicaLost when the replica died (they may migrate: whoever gives
        up on one counts it as failed), else with EngineUnavailable."""
        error = ReplicaLost if lost else EngineUnavailable
        for rid, req in list(self._reqs.items()):
            if not req.finished:
                req.finished = True
                req.queue.put_nowait(error(message))
                if not req.acked.done():
                    req.acked.set_exception(EngineUnavailable(message))
                    req.acked.exception()  # mark retrieved
            self._acc.drop(rid)
        self._reqs.clear()
        self._num_waiting = self._outstanding = 0

    # --- load (for routing) --------------------------------------------------------------------------------
    @property
    def num_in_flight(self) -> int:
        return len(self._reqs)

    @property
    def num_waiting(self) -> int:
        """Requests here that have not produced their first token yet (queued or prefilling)."""
        return self._num_waiting

    @property
    def outstanding_tokens(self) -> int:
        """Work left here in tokens (RequestState.outstanding_tokens summed, kept as requests change)."""
        return self._outstanding

    def _track(self, request_id: str, req: RequestState) -> None:
        self._reqs[request_id] = req
        self._num_waiting += req.first_token_time is None
        self._outstanding += req.outstanding_tokens

    def _untrack(self, request_id: str) -> RequestState | None:
        req = self._reqs.pop(request_id, None)
        if req is not None:
            self._num_waiting -= req.first_token_time is None
            self._outstanding -= req.outstanding_tokens
        return req

    # --- requests ------------------------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          prompt: str | None = None, arrival: float | None = None,
                          progress: Progress | None = None) -> RequestStream:
        """Send the request to the core and wait for its verdict: RequestRejected (client error) or a stream.

        `progress`: the request already ran elsewhere and got this far (migration); the core prefills its tokens
        again and continues, and the stream's outputs carry on from it (cumulative text, ids and logprobs)."""
        if self.state != "ready" or self._writer is None:
            raise EngineUnavailable(f"replica {self.replica} is not serving ({self.state})")
        if request_id in self._reqs:
            raise RequestRejected(f"request id {request_id!r} is already in use")
        ids = [int(t) for t in prompt_token_ids]
        max_model_len = int(self.engine_args.get("max_model_len") or 0) or None
        max_tokens = params.max_tokens if params.max_tokens is not None else \
            max(1, (max_model_len or len(ids) + 1) - len(ids))
        add: dict[str, Any] = {"t": "add", "id": request_id, "prompt_token_ids": ids, "params": params}
        if progress is not None and progress.num_tokens:
            add["resume"] = {"outputs": progress.token_ids,
                             "logprobs": progress.logprobs if params.logprobs is not None else None}
        try:
            msg = codec.encode_frame(add)
        except (OverflowError, TypeError, ValueError) as e:  # e.g. an id beyond 64 bits: never reaches the core
            raise RequestRejected(f"the request cannot be encoded: {e}") from None
        req = RequestState(asyncio.Queue(), len(ids), max_tokens, params.n, arrival or time.monotonic(),
                           asyncio.get_running_loop().create_future(),
                           generated=progress.num_tokens if progress is not None else 0)
        self._track(request_id, req)
        self._acc.add(request_id, prompt, ids, params.n, params.logprobs is not None, progress)
        self._writer.write(msg)
        stream = RequestStream(request_id, self, req)
        try:
            await req.acked
        except BaseException:
            stream.close()
            raise
        if self.metrics is not None:
            self.metrics.on_request_accepted(self.replica, len(ids))
        return stream

    def abort(self, request_id: str) -> None:
        req = self._untrack(request_id)
        self._acc.drop(request_id)
        if req is None:
            return
        req.finished = True
        accepted = req.acked.done() and not req.acked.cancelled() and req.acked.exception() is None
        if self.metrics is not None and accepted:
            self.metrics.on_request_finished(self.replica, "abort", time.monotonic() - req.arrival)
        if self.state == "ready" and self._writer is not None:
            self._writer.write(codec.encode_frame({"t": "abort", "ids": [request_id]}))

    # --- the background loop -------------------------------------------------------------------------------
    async def _read_loop(self, reader: asyncio.StreamReader, decoder: codec.FrameDecoder) -> None:
        try:
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    code = self.proc.poll() if self.proc else None
                    if code is None and self.proc is not None:
                        try:
                            code = await asyncio.to_thread(self.proc.wait, 2.0)
                        except subprocess.TimeoutExpired:
                            code = None
                    return self._died(f"engine core process exited with code {code}" if code is not None
                                      else "engine core closed its channel")
                self._last_msg = time.monotonic()
                decoder.feed(data)
                for msg in decoder:
                    self._handle(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug or a corrupt stream: treat the core as lost rather than hang requests
            logger.exception("replica %d: channel error", self.replica)
            self._died(f"channel error: {e}")

    def _handle(self, msg: dict | codec.BadFrame) -> None:
        if isinstance(msg, codec.BadFrame):  # a core bug; the channel itself is fine
            logger.error("replica %d sent a message that did not decode (%s): %s", self.replica,
                         (msg.head or {}).get("t", "unknown type"), msg.error)
            return
        kind = msg.get("t")
        if kind == "outs":
            now = time.monotonic()
            for d in msg["outs"]:
                self._on_output(d, now)
        elif kind == "ack":
            req = self._reqs.get(msg["id"])
            if req is not None and not req.acked.done():
                if msg.get("error"):
                    self._untrack(msg["id"])
                    self._acc.drop(msg["id"])
                    req.finished = True
                    err = msg["error"]
                    exc = EngineUnavailable(err) if err.startswith("engine failure") else RequestRejected(err)
                    req.acked.set_exception(exc)
                else:
                    req.acked.set_result(True)
        elif kind == "stats":
            self.stats = {k: v for k, v in msg.items() if k != "t"}
            if self.metrics is not None:
                self.metrics.on_core_stats(self.replica, self.stats)
        elif kind == "hb":
            pass  # liveness only: _read_loop already noted the time
        elif kind == "dead":  # it exits by itself once its ranks are stopped and its segments freed
            self._died(f"engine failure: {msg.get('reason')}", exit_grace_s=DEAD_EXIT_GRACE_S)

    def _on_output(self, d: OutputDelta, now: float) -> None:
        req = self._reqs.get(d.request_id)
        out = self._acc.decode(d)
        if req is None or out is None:
            return
        new = sum(len(c.token_ids_delta) for c in out.outputs)
        if new:
            was_waiting, before = req.first_token_time is None, req.outstanding_tokens
            req.generated += new
            if self.metrics is not None:
                if req.first_token_time is None:
                    self.metrics.on_first_token(self.replica, now - req.arrival)
                else:
                    self.metrics.on_inter_token(self.replica, now - (req.last_token_time or now))
                self.metrics.on_generation_tokens(self.replica, new)
            if req.first_token_time is None:
                req.first_token_time = now
            req.last_token_time = now
            self._num_waiting -= was_waiting
            self._outstanding += req.outstanding_tokens - before
        if out.error:
            req.finished = True
            self._untrack(d.request_id)
            req.queue.put_nowait(EngineUnavailable(f"replica {self.replica}: {out.error}"))
            if self.metrics is not None:
                self.metrics.on_request_finished(self.replica, "error", now - req.arrival)
            return
        if out.finished:
            req.finished = True
            self._untrack(d.request_id)
            if self.metrics is not None:
                reason = out.outputs[0].finish_reason if out.outputs else "stop"
                self.metrics.on_request_finished(self.replica, reason or "stop", now - req.arrival)
        req.queue.put_nowait(out)

    async def _watchdog(self) -> None:
        """Fail a core that died without closing the socket (never seen) or whose heartbeat stopped: its heartbeat
        thread speaks every 0.5 s whatever the engine does, so silence means a stopped or frozen process, never a
        long step."""
        tick = time.monotonic()
        while self.state == "ready":
            await asyncio.sleep(0.25)
            code = self.proc.poll() if self.proc else None
            if code is not None:
                return self._died(f"engine core process exited with code {code}")
            now = time.monotonic()
            lagged, tick = now - tick > 1.25, now
            if lagged:  # this event loop was blocked: let the reader take what the core sent meanwhile first
                continue
            silent = self.silent_s
            if silent > self.heartbeat_timeout_s:
                return self._died(f"engine core sent no heartbeat for {silent:.0f} s (stopped or frozen; "
                                  f"--engine-heartbeat-timeout {self.heartbeat_timeout_s:g}); killed it")
