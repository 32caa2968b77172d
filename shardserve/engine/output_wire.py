"""The engine-core output wire: RequestOutput → OutputDelta (codec-registered) → RequestOutput again.

The core's OutputEncoder sends only what is new (text / token / logprob deltas), the prompt logprobs once (when
complete) and, once a sample finishes, its full text, so a long stream costs O(tokens) bytes; the client's
OutputAccumulator rebuilds cumulative RequestOutputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from shardserve.distributed import codec
from shardserve.engine.request_stream import Progress
from shardserve.outputs import CompletionOutput, RequestMetrics, RequestOutput

__all__ = ["CompletionDelta", "OutputDelta", "OutputEncoder", "OutputAccumulator"]

codec.register(RequestMetrics, name="RequestMetrics")


@codec.register(name="CompletionDelta")
@dataclass
class CompletionDelta:
    """What one sample of a request added since its previous output."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    full_text: str | None = None    # the whole text, sent once the sample has finished


@codec.register(name="OutputDelta")
@dataclass
class OutputDelta:
    """What one request added since its previous output (one per request and engine step)."""
    request_id: str
    finished: bool
    outputs: list[CompletionDelta]
    error: str | None = None
    prompt_logprobs: list[dict | None] | None = None   # sent once, as soon as complete (or when finished)
    metrics: RequestMetrics | None = None              # sent with the final output only


class OutputEncoder:
    """Core side: RequestOutput → OutputDelta (remembers which requests already got their prompt logprobs)."""

    def __init__(self) -> None:
        self._prompt_lp_sent: set[str] = set()

    def encode(self, o: RequestOutput) -> OutputDelta:
        d = OutputDelta(o.request_id, o.finished, [
            CompletionDelta(c.index, c.text_delta, list(c.token_ids_delta), list(c.logprobs_delta or []),
                            c.finish_reason, c.stop_reason, c.text if c.finish_reason else None)
            for c in o.outputs], error=o.error)
        plp = o.prompt_logprobs
        if plp is not None and o.request_id not in self._prompt_lp_sent and \
                (len(plp) >= len(o.prompt_token_ids) or o.finished):
            d.prompt_logprobs = list(plp)
            self._prompt_lp_sent.add(o.request_id)
        if o.finished:
            d.metrics = o.metrics
            self._prompt_lp_sent.discard(o.request_id)
        return d


@dataclass
class _Acc:
    prompt: str | None
    prompt_token_ids: list[int]
    n: int
    want_logprobs: bool
    texts: list[str] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    lps: list[list[dict]] = field(default_factory=list)
    prompt_logprobs: list | None = None


class OutputAccumulator:
    """Client side: OutputDeltas → cumulative RequestOutputs whose *_delta fields hold what this message added."""

    def __init__(self) -> None:
        self._reqs: dict[str, _Acc] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], n: int,
            want_logprobs: bool, progress: Progress | None = None) -> None:
        """Start accumulating a request; `progress`: what an earlier replica already reported (migration)."""
        p = progress if progress is not None else Progress.of(None, n)
        self._reqs[request_id] = _Acc(prompt, list(prompt_token_ids), n, want_logprobs, list(p.texts),
                                      [list(t) for t in p.token_ids], [list(lp) for lp in p.logprobs],
                                      p.prompt_logprobs)

    def drop(self, request_id: str) -> None:
        self._reqs.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._reqs

    def decode(self, d: OutputDelta) -> RequestOutput | None:
        acc = self._reqs.get(d.request_id)
        if acc is None:
            return None  # aborted or unknown: drop
        outs = []
        for c in d.outputs:
            i = c.index
            acc.texts[i] = c.full_text if c.full_text is not None else acc.texts[i] + c.text
            acc.ids[i].extend(c.token_ids)
            acc.lps[i].extend(c.logprobs)
            outs.append(CompletionOutput(index=i, text=acc.texts[i], token_ids=list(acc.ids[i]),
                                         logprobs=list(acc.lps[i]) if acc.want_logprobs else None,
                                         finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                         text_delta=c.text, token_ids_delta=list(c.token_ids),
                                         logprobs_delta=list(c.logprobs)))
        if d.prompt_logprobs is not None:
            acc.prompt_logprobs = d.prompt_logprobs
        if d.finished or d.error:
            self._reqs.pop(d.request_id, None)
        return RequestOutput(d.request_id, acc.prompt, acc.prompt_token_ids, outs, bool(d.finished),
                             prompt_logprobs=acc.prompt_logprobs, metrics=d.metrics, error=d.error)

    def fail(self, request_id: str, error: str) -> RequestOutput | None:
        """An error output for a request the core can no longer finish (its replica died)."""
        acc = self._reqs.pop(request_id, None)
        if acc is None:
            return None
        outs = [CompletionOutput(index=i, text=acc.texts[i], token_ids=list(acc.ids[i]), finish_reason="error")
                for i in range(acc.n)]
        return RequestOutput(request_id, acc.prompt, acc.prompt_token_ids, outs, True, error=error)
