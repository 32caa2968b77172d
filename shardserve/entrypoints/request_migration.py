"""Request migration: a request whose replica dies continues on a surviving one, and its client never knows.

The router hands out a MigratingStream. It yields the request's outputs from the stream of the replica that runs it;
when that replica dies (ReplicaLost: its process exited, its heartbeat stopped, or its engine lost a rank) it places
the request again on a healthy replica with what the client already has (`request_stream.Progress`): the prompt and
every token already sent are prefilled there (`request_transfer.resume_request`), penalties and stop strings see
those tokens as output, a seeded sample draws on where it was (draws are counter-based: `layers.sampler.step_seed`),
and the new replica reports only what comes next, so the text goes on with nothing repeated and nothing missing.
Greedy requests give exactly the text an unkilled run gives.

A request moves at most `max_migrations` times (0 turns migration off); past that, or with no healthy replica to
take it, the client gets the error. Aborts (the client went away) and shutdowns never migrate.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Awaitable, Callable

from shardserve.engine.request_stream import Progress, ReplicaLost, RequestRejected, RequestStream

if TYPE_CHECKING:
    from shardserve.outputs import RequestOutput
    from shardserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["MigratingStream", "Place"]

# (request_id, prompt_token_ids, params, prompt, arrival, progress, exclude) → the stream on the chosen replica
Place = Callable[[str, list[int], "SamplingParams", "str | None", float, "Progress | None", "set[int]"],
                 Awaitable[RequestStream]]


class MigratingStream:
    """The outputs of one request, in order, across the replicas that run it (the RequestStream interface)."""

    def __init__(self, place: Place, stream: RequestStream, prompt_token_ids: list[int], params: SamplingParams,
                 prompt: str | None, arrival: float, max_migrations: int,
                 on_migrated: Callable[[int, int | None, float], None] | None = None) -> None:
        self._place = place
        self._stream = stream
        self._prompt_token_ids = prompt_token_ids
        self._params = params
        self._prompt = prompt
        self._arrival = arrival
        self.max_migrations = max_migrations
        self.migrations = 0
        self._on_migrated = on_migrated   # (from replica, to replica or None: failed, arrival)
        self._last: RequestOutput | None = None
        self._closed = False

    @property
    def request_id(self) -> str:
        return self._stream.request_id

    @property
    def replica(self) -> int:
        return self._stream.replica

    def __aiter__(self) -> "MigratingStream":
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            try:
                out = await self._stream.__anext__()
            except ReplicaLost as lost:
                if self._closed or self.migrations >= self.max_migrations:
                    self._gave_up()
                    raise
                self._stream = await self._migrate(lost)
                continue
            self._last = out
            return out

    async def _migrate(self, lost: ReplicaLost) -> RequestStream:
        src = self._stream.replica
        progress = Progress.of(self._last, self._params.n)
        params = self._params
        if progress.prompt_logprobs is not None and params.prompt_logprobs is not None:
            params = params.clone()  # the client has them already: not computed again
            params.prompt_logprobs = None
        try:
            stream = await self._place(self.request_id, self._prompt_token_ids, params, self._prompt, self._arrival,
                                       progress if progress.num_tokens or progress.prompt_logprobs else None, {src})
        except (RequestRejected, RuntimeError) as e:  # nowhere to go (EngineUnavailable, QueueFull...)
            logger.warning("request %s could not migrate off replica %d: %s", self.request_id, src, e)
            self._gave_up()
            raise lost from None
        self.migrations += 1
        logger.warning("request %s migrated from replica %d to %d after %d tokens (%s)", self.request_id, src,
                       stream.replica, progress.num_tokens, lost)
        if self._on_migrated is not None:
            self._on_migrated(src, stream.replica, self._arrival)
        return stream

    def _gave_up(self) -> None:
        if self._on_migrated is not None and not self._closed:
            self._on_migrated(self._stream.replica, None, self._arrival)

    def close(self) -> None:
        self._closed = True
        self._stream.close()
