"""Offline data parallelism (`LLM(data_parallel_size=N)`) over N EngineCoreClients, the server's core client.

The clients run on a private asyncio loop in a daemon thread; each request goes to the least-loaded replica, and
step() drains the outputs they have produced from a thread-safe queue.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Coroutine
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from shardserve.engine.args import EngineArgs
from shardserve.engine.core_client import EngineCoreClient
from shardserve.engine.core_launch import core_threads
from shardserve.engine.llm_engine import EngineDeadError, load_tokenizer, prompt_ids, validate_request
from shardserve.engine.request_stream import RequestStream
from shardserve.entrypoints.router import ReplicaLoad, core_engine_args, pick_replica
from shardserve.outputs import CompletionOutput, RequestOutput
from shardserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from shardserve.config import EngineConfig

logger = logging.getLogger(__name__)

POLL_S = 0.05          # step() waits at most this long for an output before returning an empty list
SHUTDOWN_S = 30.0      # how long shutdown() waits for the cores to stop (each is killed after 10 s)

T = TypeVar("T")


class _Request:
    """A request this driver holds: the future of the task that feeds its outputs into the queue. Queued outputs
    carry it, so those of an aborted request are dropped rather than taken for a later one's with the same id."""
    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: concurrent.futures.Future | None = None


class DataParallelEngines:
    """The engine interface LLM uses (tokenizer, cfg, add_request, step, abort_request, shutdown) over N cores."""

    def __init__(self, args: EngineArgs, progress: bool = True) -> None:
        model = args.resolve_model(progress)
        self.cfg: EngineConfig = replace(args, model=model, data_parallel_size=1).create_config(progress)  # replica 0
        # skip_tokenizer_init: no tokenizer here nor in the cores (each builds its config from the same args)
        self.tokenizer: PreTrainedTokenizerBase | None = \
            None if self.cfg.model.skip_tokenizer_init else load_tokenizer(self.cfg.model.tokenizer)
        n = args.data_parallel_size
        core_args = core_engine_args(args, self.cfg.model.max_model_len, model)
        threads = core_threads(n)
        self.cores: list[EngineCoreClient] = [EngineCoreClient(core_args, replica=i, threads=threads)
                                              for i in range(n)]
        self._assigned = [0] * n
        self._requests: dict[str, _Request] = {}
        self._outputs: queue.SimpleQueue[tuple[_Request, RequestOutput]] = queue.SimpleQueue()
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = threading.Thread(target=self._loop.run_forever,
                                                                 name="shardserve-dp-cores", daemon=True)
        self._thread.start()
        try:
            self._call(self._start())
        except BaseException:
            self.shutdown()
            raise

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the clients' loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        """Start every core (in parallel); the first failure is raised (shutdown() then stops the others)."""
        results = await asyncio.gather(*(c.start() for c in self.cores), return_exceptions=True)
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            raise errors[0]

    # --- the engine interface ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = prompt_ids(self.tokenizer, prompt, prompt_token_ids, params)
        # the engine's own checks, here so that a bad prompt raises at add time as with one engine
        validate_request(ids, params, self.cfg.model.max_model_len, self.cfg.model.vocab_size)
        if not any(c.healthy for c in self.cores):
            raise EngineDeadError("every engine core has died: " + self._dead_reasons())
        req = _Request()
        self._requests[request_id] = req
        # the replica is chosen on the loop, where the clients' loads are exact; adds keep their order there
        req.future = asyncio.run_coroutine_threadsafe(self._run(req, request_id, prompt, ids, params), self._loop)

    def _dead_reasons(self) -> str:
        return "; ".join(f"replica {c.replica}: {c.dead_reason or c.state}" for c in self.cores)

    async def _run(self, req: _Request, request_id: str, prompt: str | None, ids: list[int],
                   params: SamplingParams) -> None:
        """On the loop: route the request, then move its outputs to the queue; a failure becomes an error output."""
        seen: dict[int, CompletionOutput] = {}   # the latest of each sample
        stream: RequestStream | None = None
        try:
            i = pick_replica([ReplicaLoad(c.healthy, c.outstanding_tokens, c.num_in_flight) for c in self.cores])
            if i is None:
                raise EngineDeadError("every engine core has died: " + self._dead_reasons())
            self._assigned[i] += 1
            stream = await self.cores[i].add_request(request_id, ids, params, prompt)
            async for out in stream:
                seen.update((c.index, c) for c in out.outputs)
                self._outputs.put((req, out))
        except Exception as e:  # rejected by the core, or its replica died: the request ends with an error
            self._outputs.put((req, _error_output(request_id, prompt, ids, params.n, seen, str(e))))
        finally:
            if stream is not None:
                stream.close()  # aborts it in the core if it did not finish (abort_request cancels this task)

    def abort_request(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is not None and req.future is not None:
            req.future.cancel()  # cancels the task on the loop, whose stream.close() aborts it in the core

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[RequestOutput]:
        """Outputs any core has produced (waits up to POLL_S for the first one); failed requests carry .error."""
        if not self._requests:
            return []
        items = []
        try:
            items.append(self._outputs.get(timeout=POLL_S))
            while True:
                items.append(self._outputs.get_nowait())
        except queue.Empty:
            pass
        outs = []
        for req, out in items:
            if self._requests.get(out.request_id) is not req:
                continue  # aborted (possibly with its id since reused)
            if out.finished or out.error:
                del self._requests[out.request_id]
            outs.append(out)
        return outs

    @property
    def requests_per_replica(self) -> list[int]:
        return list(self._assigned)

    def shutdown(self) -> None:
        if self._thread is None:
            return
        for req in self._requests.values():
            if req.future is not None:
                req.future.cancel()
        self._requests.clear()
        try:
            self._call(self._shutdown(), timeout=SHUTDOWN_S)
        except Exception:  # noqa: BLE001 - best effort; the cores are killed below if still there
            logger.exception("shutting down the engine cores")
        for c in self.cores:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._thread = None
        if not self._loop.is_running():
            self._loop.close()

    async def _shutdown(self) -> None:
        await asyncio.gather(*(c.shutdown() for c in self.cores), return_exceptions=True)


def _error_output(request_id: str, prompt: str | None, ids: list[int], n: int, done: dict[int, CompletionOutput],
                  error: str) -> RequestOutput:
    """The final output of a request that could not finish: what it had produced, finish_reason "error"."""
    outs = [CompletionOutput(index=i, text=done[i].text if i in done else "",
                             token_ids=list(done[i].token_ids) if i in done else [], finish_reason="error")
            for i in range(n)]
    return RequestOutput(request_id, prompt, ids, outs, True, error=error)
