"""Moving a running request between engines: `export_request` takes its tokens so far and the KV blocks of every
rank; `import_request` makes another engine (of the same model and layout, with its own executor and process group)
continue it exactly where it stopped. Seeded samples need no generator state: their draws are counter-based
(`layers.sampler.step_seed`). This is the core of disaggregated prefill/decode; `resume_request` is the same without
KV (the tokens so far are prefilled again), which is how a request migrates off a replica that died. A snapshot is
codec-registered, so it crosses processes as msgpack."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shardserve.distributed import codec
from shardserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from shardserve.engine.llm_engine import LLMEngine, _Request
    from shardserve.engine.sequence import Sequence


@codec.register(name="SeqSnapshot")
@dataclass
class SeqSnapshot:
    index: int
    output_token_ids: list[int]
    num_computed_tokens: int                 # tokens whose KV is in kv_blocks (a prefix of prompt + output)
    kv_blocks: list[torch.Tensor]            # per rank: [layers, 2, kv_heads, blocks, block_size, head_dim]
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@codec.register(name="RequestSnapshot")
@dataclass
class RequestSnapshot:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams                   # the request's own (sample i's seed is params.seed + i)
    block_size: int
    seqs: list[SeqSnapshot]


def export_request(engine: LLMEngine, request_id: str) -> RequestSnapshot:
    """Everything another engine needs to continue `request_id`. Call it between steps (nothing of the request in
    flight); the request keeps running here unless the caller aborts it."""
    req = engine.requests.get(request_id)
    if req is None:
        raise KeyError(f"request {request_id!r} is not in this engine")
    if any(s.in_flight for s in req.seqs):
        raise ValueError(f"request {request_id!r} is in a step now; export it between steps")
    ex, bs = engine.executor, engine.cfg.cache.block_size
    seqs = []
    for seq in req.seqs:
        n_blocks = -(-seq.num_computed_tokens // bs)
        table = engine.scheduler.block_manager.block_table(seq.seq_id)[:n_blocks] if n_blocks else []
        seqs.append(SeqSnapshot(seq.index, list(seq.output_token_ids), seq.num_computed_tokens,
                                ex.read_kv_blocks(table) if table else [], list(seq.logprobs),
                                seq.finish_reason, seq.stop_reason))
    params = req.seqs[0].params.clone()
    return RequestSnapshot(request_id, req.prompt, list(req.prompt_token_ids), params, bs, seqs)


def import_request(engine: LLMEngine, snap: RequestSnapshot, request_id: str | None = None) -> None:
    """Continue a snapshot here: its KV blocks written into blocks of this engine, its samples resumed as running
    sequences (their next step is the decode of their last token; a sample without KV is prefilled again, prompt and
    output). Text already reported by the exporting engine is not reported again."""
    rid = snap.request_id if request_id is None else request_id
    ex = engine.executor
    if snap.block_size != engine.cfg.cache.block_size:
        raise ValueError(f"the snapshot has {snap.block_size}-token blocks; this engine uses "
                         f"{engine.cfg.cache.block_size} (--block-size must match)")
    if any(s.kv_blocks and len(s.kv_blocks) != ex.world_size for s in snap.seqs):
        raise ValueError(f"the snapshot's KV comes from a different number of ranks than this engine's "
                         f"{ex.world_size} (tp x pp must match)")
    engine.add_request(rid, snap.prompt, snap.params, prompt_token_ids=snap.prompt_token_ids)
    req = engine.requests[rid]
    try:
        for seq, s in zip(req.seqs, snap.seqs):
            _restore(engine, req, seq, s)
    except BaseException:
        engine.abort_request(rid)
        raise


def _restore(engine: LLMEngine, req: _Request, seq: Sequence, s: SeqSnapshot) -> None:
    sched, bm = engine.scheduler, engine.scheduler.block_manager
    seq.token_ids.extend(s.output_token_ids)
    seq.logprobs = list(s.logprobs)
    detok = req.detoks[seq.index]
    detok.add_tokens(list(s.output_token_ids))  # text the other engine already reported: context only
    req.sent_tokens[seq.index] = len(s.output_token_ids)
    if s.finish_reason is not None:
        sched.finish(seq, s.finish_reason, s.stop_reason)
        return
    if not s.num_computed_tokens:
        return  # nothing cached: it is prefilled here like a new request
    if s.num_computed_tokens >= seq.num_tokens:
        raise ValueError(f"sample {seq.index} claims {s.num_computed_tokens} computed tokens of {seq.num_tokens}")
    bm.allocate_prefix(seq.seq_id, [])
    if not bm.allocate_slots(seq.seq_id, s.num_computed_tokens):
        raise ValueError(f"no room for {s.num_computed_tokens} tokens of KV ({bm.num_free_blocks} free blocks)")
    engine.executor.write_kv_blocks(bm.block_table(seq.seq_id), s.kv_blocks)
    seq.num_computed_tokens = s.num_computed_tokens
    bm.cache_full_blocks(seq.seq_id, seq.token_ids, s.num_computed_tokens)
    sched.resume(seq)


def resume_request(engine: LLMEngine, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                   output_token_ids: list[list[int]], logprobs: list[list[dict]] | None = None) -> None:
    """Continue a request whose engine is gone: sample i has already produced `output_token_ids[i]` (reported to
    the client with `logprobs[i]`). Its prompt and those tokens are prefilled here (as after a preemption by
    recompute), penalties and stop strings see them as output, and only what comes next is reported."""
    if len(output_token_ids) != params.n:
        raise ValueError(f"resume needs the tokens of all {params.n} samples, got {len(output_token_ids)}")
    lps = logprobs if logprobs is not None else [[] for _ in output_token_ids]
    seqs = [SeqSnapshot(i, [int(t) for t in ids], 0, [], list(lp) if lp else [{} for _ in ids])
            for i, (ids, lp) in enumerate(zip(output_token_ids, lps))]
    import_request(engine, RequestSnapshot(request_id, None, list(prompt_token_ids), params,
                                           engine.cfg.cache.block_size, seqs))
