"""One request on the client side of an engine core: its output stream, its state, the errors it can raise.

RequestStream yields outputs in order (a backlog merged into one) and aborts the request in the core when closed
early; RequestState is what EngineCoreClient tracks of it; Progress is what a client already has of a request that
moves to another replica; EngineUnavailable / ReplicaLost / RequestRejected are the errors.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shardserve.outputs import RequestOutput

if TYPE_CHECKING:
    from shardserve.engine.core_client import EngineCoreClient

__all__ = ["EngineUnavailable", "ReplicaLost", "RequestRejected", "RequestState", "RequestStream", "Progress"]


class EngineUnavailable(RuntimeError):
    """The replica is not serving (starting, dead or stopped); the request was not (or no longer) run there."""


class ReplicaLost(EngineUnavailable):
    """The replica died (or stalled and was killed) while it held the request: the request may migrate."""


@dataclass
class Progress:
    """What the client already has of a request (per sample: text, token ids, logprobs; the prompt logprobs), so
    that another replica continues it (the tokens are prefilled there again) and only what is new is reported."""
    texts: list[str]
    token_ids: list[list[int]]
    logprobs: list[list[dict]]
    prompt_logprobs: list | None = None

    @classmethod
    def of(cls, out: RequestOutput | None, n: int) -> "Progress":
        if out is None:
            return cls([""] * n, [[] for _ in range(n)], [[] for _ in range(n)])
        by_index = {c.index: c for c in out.outputs}
        return cls([by_index[i].text if i in by_index else "" for i in range(n)],
                   [list(by_index[i].token_ids) if i in by_index else [] for i in range(n)],
                   [list(by_index[i].logprobs or []) if i in by_index else [] for i in range(n)],
                   out.prompt_logprobs)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


class RequestRejected(ValueError):
    """The engine refused the request (prompt too long, max_tokens too big, bad token ids...): a client error."""


@dataclass
class RequestState:
    """What the client tracks of one request it sent to its core: the output queue, the ack, the load it adds."""
    queue: asyncio.Queue
    prompt_len: int
    max_tokens: int          # per sample
    n: int
    arrival: float
    acked: asyncio.Future
    generated: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished: bool = False

    @property
    def outstanding_tokens(self) -> int:
        """Work left in the core: the prompt until its first token, plus the tokens still to generate."""
        return (0 if self.first_token_time else self.prompt_len) + max(0, self.max_tokens * self.n - self.generated)


@dataclass
class RequestStream:
    """The outputs of one request, in order. Iterate it; close() it when done (aborts it if unfinished)."""
    request_id: str
    client: EngineCoreClient
    _req: RequestState = field(repr=False)
    _closed: bool = False

    @property
    def replica(self) -> int:
        return self.client.replica

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._closed or (self._req.finished and self._req.queue.empty()):
            raise StopAsyncIteration
        item = await self._req.queue.get()
        # merge what else is already here: a slow consumer gets one output per wake-up, not a backlog
        while not self._req.queue.empty() and isinstance(item, RequestOutput) and not item.finished:
            nxt = self._req.queue.get_nowait()
            if not isinstance(nxt, RequestOutput):
                self._req.queue.put_nowait(nxt)  # an error: deliver what we have first
                break
            item = _merge(item, nxt)
        if isinstance(item, Exception):
            self._closed = True
            raise item
        return item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._req.finished:
                self.client.abort(self.request_id)


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """b is cumulative; its deltas must also cover what a added."""
    prev = {c.index: c for c in a.outputs}
    for c in b.outputs:
        p = prev.pop(c.index, None)
        if p is not None:
            c.text_delta = p.text_delta + c.text_delta
            c.token_ids_delta = p.token_ids_delta + c.token_ids_delta
            c.logprobs_delta = list(p.logprobs_delta or []) + list(c.logprobs_delta or [])
    b.outputs = sorted(b.outputs + list(prev.values()), key=lambda c: c.index)
    return b
