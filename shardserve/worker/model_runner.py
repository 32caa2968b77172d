"""Turns a SchedulerOutput into model inputs (token ids, positions, slot mapping, block tables), runs this
rank's part of the model, and on the last stage computes logits and samples."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from shardserve.step import ModelRunnerOutput, ScheduledSeq, SchedulerOutput
from shardserve.layers.attention import AttentionMetadata
from shardserve.layers.sampler import (Sampler, SamplingMetadata, compute_prompt_logprobs, make_generator,
                                       seed_generator)
from shardserve.models.base import IntermediateTensors
from shardserve.sampling_params import SamplingParams
from shardserve.worker.cuda_graph import DecodeGraphs


@dataclass
class SeqState:
    """What the sampling rank remembers about a sequence between steps."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None


@dataclass
class StepInputs:
    order: list[ScheduledSeq]                  # decodes first, then prefills
    input_ids: torch.Tensor                    # [tokens]
    positions: torch.Tensor                    # [tokens]
    meta: AttentionMetadata
    sample_rows: list[int] = field(default_factory=list)   # token index of each sampled seq's last token


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int, device: str,
                 eos_token_ids: list[int], vocab_size: int, is_last_stage: bool = True) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = torch.device(device)
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.is_last_stage = is_last_stage
        self.sampler = Sampler()
        self.states: dict[int, SeqState] = {}  # unseeded rows draw from torch's global RNG (seeded per rank)
        self.graphs: DecodeGraphs | None = None  # captured decode steps (GPU), set by the worker

    # --- per-sequence state ----------------------------------------------------------------------------------
    def update_states(self, sched: SchedulerOutput) -> None:
        for seq_id in sched.finished_seq_ids:
            self.states.pop(seq_id, None)
        for item in sched.seqs:
            if item.params is None:
                continue
            params = item.params
            old = self.states.get(item.seq_id)
            gen = old.generator if old is not None else (
                make_generator(params.seed, self.device) if params.seed is not None else None)
            self.states[item.seq_id] = SeqState(params, list(item.prompt_token_ids or []),
                                                list(item.output_token_ids or []), gen)

    # --- inputs ----------------------------------------------------------------------------------------------
    def prepare_inputs(self, sched: SchedulerOutput) -> StepInputs:
        order = sorted(sched.seqs, key=lambda s: len(s.token_ids) != 1)  # stable: decodes first
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        seq_lens, query_lens, sample_rows = [], [], []
        bs = self.block_size
        for item in order:
            n = len(item.token_ids)
            ids.extend(item.token_ids)
            table = item.block_table
            for p in range(item.start_pos, item.start_pos + n):
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            seq_lens.append(item.start_pos + n)
            query_lens.append(n)
            if item.do_sample:
                sample_rows.append(len(ids) - 1)
        max_blocks = max(len(s.block_table) for s in order)
        tables = torch.zeros(len(order), max_blocks, dtype=torch.int64)
        for i, item in enumerate(order):
            tables[i, : len(item.block_table)] = torch.tensor(item.block_table, dtype=torch.int64)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev), block_tables=tables.to(dev),
            seq_lens=seq_lens, query_lens=query_lens,
            seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int64, device=dev),
            num_decodes=sum(1 for q in query_lens if q == 1), block_size=bs)
        return StepInputs(order, torch.tensor(ids, dtype=torch.int64, device=dev),
                          torch.tensor(pos, dtype=torch.int64, device=dev), meta, sample_rows)

    # --- execution -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, inputs: StepInputs, intermediate: IntermediateTensors | None = None):
        if self.graphs is not None and self.graphs.can_run(inputs.meta):
            return self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta, intermediate)
        return self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, intermediate)

    @torch.inference_mode()
    def sample(self, inputs: StepInputs, hidden: torch.Tensor, step_id: int) -> ModelRunnerOutput:
        """Last stage: logits at the sampled positions (and prompt positions that want logprobs), then sample."""
        t0 = time.perf_counter()
        sampled = [item for item in inputs.order if item.do_sample]
        result = ModelRunnerOutput(seq_ids=[s.seq_id for s in sampled], token_ids=[], logprobs=[], step_id=step_id)
        self._prompt_logprobs(inputs, hidden, result)
        if sampled:
            logits = self.model.compute_logits(hidden[inputs.sample_rows])  # [sampled seqs, vocab]
            states = [self.states[s.seq_id] for s in sampled]
            for st in states:  # counter-based draws: the seed of output position t (see step_seed)
                if st.generator is not None:
                    seed_generator(st.generator, st.params.seed, len(st.output_token_ids))
            meta = SamplingMetadata.build(
                [st.params for st in states], [st.prompt_token_ids for st in states],
                [st.output_token_ids for st in states], [st.generator for st in states],
                self.eos_token_ids, logits.shape[-1], self.device)
            out = self.sampler(logits, meta)
            for st, tok in zip(states, out.token_ids):
                st.output_token_ids.append(tok)
            result.token_ids = list(out.token_ids)
            result.logprobs = [asdict(lp) if lp is not None else None for lp in out.logprobs]
        result.timings["sample_s"] = time.perf_counter() - t0
        return result

    def _prompt_logprobs(self, inputs: StepInputs, hidden: torch.Tensor, result: ModelRunnerOutput) -> None:
        start = 0
        for item in inputs.order:
            n = len(item.token_ids)
            st = self.states.get(item.seq_id)
            k = st.params.prompt_logprobs if st is not None else None
            prompt_len = len(st.prompt_token_ids) if st is not None else 0
            if k is not None and item.start_pos < prompt_len:
                entries: list[dict | None] = [None] if item.start_pos == 0 else []
                # positions start_pos .. predict prompt tokens start_pos+1 .. (within the prompt)
                m = min(n, prompt_len - 1 - item.start_pos)
                if m > 0:
                    logits = self.model.compute_logits(hidden[start:start + m])
                    targets = torch.tensor(st.prompt_token_ids[item.start_pos + 1:item.start_pos + 1 + m],
                                           device=logits.device)
                    entries += [asdict(x) for x in compute_prompt_logprobs(logits, targets, k)]
                result.prompt_logprobs[item.seq_id] = entries
            start += n

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Single-stage convenience: update state, build inputs, forward, sample."""
        self.update_states(sched)
        t0 = time.perf_counter()
        inputs = self.prepare_inputs(sched)
        hidden = self.forward(inputs)
        t1 = time.perf_counter()
        result = self.sample(inputs, hidden, sched.step_id)
        result.timings["forward_s"] = t1 - t0
        return result
