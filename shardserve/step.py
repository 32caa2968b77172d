"""The messages of one step: what the scheduler sends every rank (`SchedulerOutput` of `ScheduledSeq`s) and what
the sampling rank sends back (`ModelRunnerOutput`).

This module sits below `engine/`, `executor/` and `worker/`: all three import it, it imports none of them. Inside one
process the messages carry real objects (`SamplingParams`, not dicts); they are encoded only at a process boundary,
by the one msgpack codec (`distributed/codec.py`), where every class here is registered by name."""
from __future__ import annotations

from dataclasses import dataclass, field

from shardserve.distributed import codec
from shardserve.sampling_params import SamplingParams


@codec.register(name="ScheduledSeq")
@dataclass
class ScheduledSeq:
    """One sequence's work in a step: compute `token_ids` at positions start_pos.. and maybe sample."""
    seq_id: int
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    do_sample: bool
    # set when the workers have no state for this seq yet (first step, or after preemption)
    params: SamplingParams | None = None
    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] | None = None


@codec.register(name="SchedulerOutput")
@dataclass
class SchedulerOutput:
    """One batch: the sequences to run and the ids whose worker-side state can be dropped."""
    seqs: list[ScheduledSeq]
    finished_seq_ids: list[int]
    step_id: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@codec.register(name="ModelRunnerOutput")
@dataclass
class ModelRunnerOutput:
    """What the sampling rank returns: one token per sampled seq, plus logprobs where asked, and every stage's
    cumulative timings (`stage{i}_compute_s`, ...)."""
    seq_ids: list[int]
    token_ids: list[int]
    logprobs: list[dict | None]
    prompt_logprobs: dict[int, list[dict | None]] = field(default_factory=dict)
    step_id: int = 0
    timings: dict[str, float] = field(default_factory=dict)
