"""A sequence: one of a request's n samples, as the scheduler and the engine track it."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from shardserve.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    index: int                      # which of the request's n samples
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int                 # resolved against the context length
    eos_token_ids: list[int] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0    # tokens whose KV is in the cache
    num_preemptions: int = 0
    in_flight: bool = False         # part of a batch that has not come back yet
    sent_to_worker: bool = False    # workers hold this seq's state (reset on preemption)
    finish_reason: str | None = None    # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict | None] = field(default_factory=list)
    first_token_time: float | None = None
    last_token_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids: list[int] = list(self.prompt_token_ids)  # prompt + output
        self.prompt_len = len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: drop all KV; the prompt and the tokens so far are prefilled again later."""
        self.status = SeqStatus.WAITING
        self.num_computed_tokens = 0
        self.num_preemptions += 1
        self.sent_to_worker = False
