"""A sequence (one of a request's n samples) and the scheduler→worker messages that describe a step."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

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


@dataclass
class ScheduledSeq:
    """One sequence's work in a step: compute `token_ids` at positions start_pos.. and maybe sample."""
    seq_id: int
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    do_sample: bool
    # set when the workers have no state for this seq yet (first step, or after preemption)
    params: dict[str, Any] | None = None
    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] | None = None


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    finished_seq_ids: list[int]      # workers drop their state for these
    step_id: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    def to_dict(self) -> dict[str, Any]:
        return {"step_id": self.step_id, "finished": self.finished_seq_ids,
                "seqs": [[s.seq_id, s.token_ids, s.start_pos, s.block_table, s.do_sample, s.params,
                          s.prompt_token_ids, s.output_token_ids] for s in self.seqs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SchedulerOutput":
        return cls(seqs=[ScheduledSeq(*row) for row in d["seqs"]], finished_seq_ids=list(d["finished"]),
                   step_id=d["step_id"])


@dataclass
class ModelRunnerOutput:
    """What the sampling rank returns: one token per sampled seq, plus logprobs where asked."""
    seq_ids: list[int]
    token_ids: list[int]
    logprobs: list[dict | None]
    prompt_logprobs: dict[int, list[dict | None]] = field(default_factory=dict)
    step_id: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    expert_counts: dict[int, list[int]] = field(default_factory=dict)  # MoE layer → tokens per expert (cumulative)

    def to_dict(self) -> dict[str, Any]:
        return {"seq_ids": self.seq_ids, "token_ids": self.token_ids, "logprobs": self.logprobs,
                "prompt_logprobs": [[k, v] for k, v in self.prompt_logprobs.items()],
                "step_id": self.step_id, "timings": self.timings,
                "expert_counts": [[k, v] for k, v in self.expert_counts.items()]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelRunnerOutput":
        return cls(seq_ids=d["seq_ids"], token_ids=d["token_ids"], logprobs=d["logprobs"],
                   prompt_logprobs={k: v for k, v in d["prompt_logprobs"]}, step_id=d["step_id"],
                   timings=d.get("timings", {}), expert_counts={k: v for k, v in d.get("expert_counts", [])})
