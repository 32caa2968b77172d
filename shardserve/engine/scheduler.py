"""Continuous batching: each step packs decodes and (chunked) prefills under a token budget, allocates paged KV
blocks, and preempts by recompute when blocks run out."""
from __future__ import annotations

from collections import deque
from typing import Iterable

from shardserve.config import CacheConfig, SchedulerConfig
from shardserve.engine.block_manager import BlockManager
from shardserve.engine.sequence import Sequence, SeqStatus
from shardserve.step import ScheduledSeq, SchedulerOutput


class Scheduler:
    def __init__(self, sched: SchedulerConfig, cache: CacheConfig, num_blocks: int) -> None:
        self.cfg = sched
        self.block_size = cache.block_size
        self.block_manager = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._finished_ids: list[int] = []      # reported to workers with the next step
        self._step_id = 0
        self.num_preemptions = 0
        # admit new work only while this many blocks stay free, so running seqs can grow without thrashing
        self.watermark_blocks = max(1, num_blocks // 100)

    # --- queue management ----------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_in_flight(self) -> int:
        return sum(s.in_flight for s in self.running)

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Mark a seq finished and release its blocks (safe for waiting, running and in-flight seqs)."""
        if seq.is_finished:
            return
        seq.status = SeqStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq.seq_id)
        self._finished_ids.append(seq.seq_id)

    def resume(self, seq: Sequence) -> None:
        """A waiting seq whose KV is already in its blocks (imported from another engine) runs from its next token."""
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def abort(self, seqs: Iterable[Sequence]) -> None:
        for seq in seqs:
            self.finish(seq, "abort")

    # --- scheduling ----------------------------------------------------------------------------------------
    def schedule(self, max_micro_batches: int = 1) -> SchedulerOutput:
        """One batch. With pipeline parallelism the engine calls this while earlier batches are in flight; each
        batch then takes about 1/max_micro_batches of the unfinished sequences, so the pipeline stays full."""
        budget = self.cfg.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        seq_limit = self.cfg.max_num_seqs
        if max_micro_batches > 1:
            seq_limit = max(1, -(-(len(self.running) + len(self.waiting)) // max_micro_batches))
        for seq in list(self.running):
            if budget == 0 or len(scheduled) >= seq_limit:
                break
            if seq.in_flight or seq.status is not SeqStatus.RUNNING:
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(seq.seq_id, seq.num_computed_tokens + n):
                victim = self._pick_victim()
                if victim is None or victim is seq:
                    if victim is seq:
                        self._preempt(seq)
                    preempted = True
                    break
                self._preempt(victim)
                preempted = True
            if seq.status is SeqStatus.RUNNING:
                scheduled.append((seq, n))
                budget -= n
        if not preempted:
            budget = self._admit(budget, scheduled, seq_limit)
        return self._build_output(scheduled)

    def _admit(self, budget: int, scheduled: list[tuple[Sequence, int]], seq_limit: int) -> int:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs \
                and len(scheduled) < seq_limit:
            seq = self.waiting[0]
            if not bm.has_seq(seq.seq_id):
                skip_cache = seq.params.prompt_logprobs is not None  # every prompt position must be computed
                seq.num_computed_tokens = bm.allocate_prefix(seq.seq_id, [] if skip_cache else seq.token_ids)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n < seq.num_tokens - seq.num_computed_tokens and not self.cfg.enable_chunked_prefill:
                break
            need = seq.num_computed_tokens + n
            if bm.num_free_blocks - bm.num_new_blocks(seq.seq_id, need) < self.watermark_blocks and self.running \
                    or not bm.allocate_slots(seq.seq_id, need):
                bm.free(seq.seq_id)  # give back prefix-cache references; retried next step
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return budget

    def _pick_victim(self) -> Sequence | None:
        """The lowest-priority (latest arrived) running seq that is not in flight."""
        for seq in reversed(self.running):
            if not seq.in_flight:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _build_output(self, scheduled: list[tuple[Sequence, int]]) -> SchedulerOutput:
        if not scheduled:  # nothing to run: keep the finished ids for the next real step
            return SchedulerOutput(seqs=[], finished_seq_ids=[], step_id=self._step_id)
        out: list[ScheduledSeq] = []
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            item = ScheduledSeq(seq_id=seq.seq_id, token_ids=seq.token_ids[start:start + n], start_pos=start,
                                block_table=self.block_manager.block_table(seq.seq_id),
                                do_sample=start + n == seq.num_tokens)
            if not seq.sent_to_worker:
                item.params = seq.params
                item.prompt_token_ids = seq.prompt_token_ids
                item.output_token_ids = seq.output_token_ids
                seq.sent_to_worker = True
            seq.in_flight = True
            out.append(item)
        finished, self._finished_ids = self._finished_ids, []
        self._step_id += 1
        return SchedulerOutput(seqs=out, finished_seq_ids=finished, step_id=self._step_id)

    def on_step_done(self, sched_out: SchedulerOutput, seqs: dict[int, Sequence]) -> None:
        """Advance computed-token counts and register newly full blocks in the prefix cache."""
        for item in sched_out.seqs:
            seq = seqs.get(item.seq_id)
            if seq is None or seq.is_finished:
                continue
            seq.in_flight = False
            seq.num_computed_tokens = item.start_pos + len(item.token_ids)
            self.block_manager.cache_full_blocks(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
