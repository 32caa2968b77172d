"""What the engine hands back per request: the prompt, and for each of the n samples its text, tokens and logprobs."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None = None          # per token: {token_id, logprob, rank, top_token_ids, top_logprobs}
    finish_reason: str | None = None            # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None        # the stop string or stop token id that ended it
    text_delta: str = ""                        # new since the previous output of this request (streaming)
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs_delta: list[dict] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict | None] | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
