"""The synchronous engine core: requests in, scheduled steps through the executor, detokenized outputs back."""
from __future__ import annotations

import itertools
from collections import deque
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardserve.config import ConfigError, EngineConfig
from shardserve.engine.detokenizer import IncrementalDetokenizer, NullDetokenizer
from shardserve.engine.scheduler import Scheduler
from shardserve.engine.sequence import Sequence
from shardserve.step import ModelRunnerOutput, SchedulerOutput
from shardserve.executor.base import ExecutorError
from shardserve.executor.factory import make_executor
from shardserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from shardserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


# Files of which a Hugging Face tokenizer directory has at least one (AutoTokenizer needs no other to start)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tiktoken.model")
_NO_TOKENIZER_HINT = ("pass a tokenizer directory with --tokenizer DIR (LLM(tokenizer=DIR)), or run on token ids "
                      "alone with --skip-tokenizer-init (LLM(skip_tokenizer_init=True), then "
                      "generate(prompt_token_ids=...))")


def load_tokenizer(path: str):
    """The tokenizer at `path`: a GGUF file's own vocabulary, else a Hugging Face tokenizer directory. A directory
    without tokenizer files, or one transformers cannot load, is a ConfigError that names it and the flags to use."""
    try:
        from shardserve.models import gguf_loader
    except ModuleNotFoundError as e:  # that module is optional; an import failing inside it is not hidden
        if e.name != "shardserve.models.gguf_loader":
            raise
        gguf_loader = None
    if gguf_loader is not None and gguf_loader.is_gguf(str(path)):
        return gguf_loader.load_gguf_tokenizer(str(path))
    p = Path(path)
    if p.is_dir() and not (any((p / f).is_file() for f in TOKENIZER_FILES) or any(p.glob("*.tiktoken"))):
        raise ConfigError(f"{p} has no tokenizer (no tokenizer.json, tokenizer_config.json, tokenizer.model or "
                          f"vocabulary file); {_NO_TOKENIZER_HINT}")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"cannot load the tokenizer in {path} ({type(e).__name__}: {' '.join(str(e).split())}); "
                          f"{_NO_TOKENIZER_HINT}") from e


def prompt_ids(tokenizer, prompt: str | None, prompt_token_ids: list[int] | None,
               params: SamplingParams) -> list[int]:
    """The request's prompt as token ids (encoding the text when no ids are given). Without a tokenizer
    (skip_tokenizer_init) text prompts and stop strings are refused, each with what to pass instead."""
    if tokenizer is None:
        if prompt_token_ids is None and prompt is not None:
            raise ValueError("this engine was started with skip_tokenizer_init (--skip-tokenizer-init) and has no "
                             "tokenizer to encode a text prompt; pass prompt_token_ids, or drop "
                             "--skip-tokenizer-init (with --tokenizer DIR if the model has no tokenizer)")
        if params.stop:
            raise ValueError("stop strings need a tokenizer, and this engine was started with skip_tokenizer_init "
                             "(--skip-tokenizer-init); use stop_token_ids, or drop --skip-tokenizer-init")
    if prompt_token_ids is None:
        if prompt is None:
            raise ValueError("either prompt or prompt_token_ids is required")
        prompt_token_ids = tokenizer.encode(prompt)
    return [int(t) for t in prompt_token_ids]


def eos_token_ids(model_dir: str, hf_config: dict[str, Any], tokenizer) -> list[int]:
    """EOS ids from generation_config.json, else config.json, else the tokenizer; a GGUF file's from its metadata
    (EOS, EOT, EOM and the end-of-turn control tokens llama.cpp stops on)."""
    from shardserve.models.gguf_loader import gguf_eos_token_ids, is_gguf
    if is_gguf(str(model_dir)) and (ids := gguf_eos_token_ids(str(model_dir))):
        return ids
    gen = Path(model_dir) / "generation_config.json"
    for source in ([json.loads(gen.read_text())] if gen.is_file() else []) + [hf_config]:
        eos = source.get("eos_token_id")
        if eos is not None:
            return list(eos) if isinstance(eos, list) else [int(eos)]
    return [tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else []


def validate_request(ids: list[int], params: SamplingParams, max_model_len: int, vocab_size: int) -> int:
    """Check a tokenized prompt and its max_tokens against the model; returns the resolved max_tokens.
    Each failure is a ValueError saying what to change (the server turns it into a 400)."""
    if not ids:
        raise ValueError("the prompt is empty; send at least one token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is out of range [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; this model's maximum context length is "
                         f"{max_model_len}, and at least one token must be generated")
    max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len - len(ids)
    if len(ids) + max_tokens > max_model_len:
        raise ValueError(f"this model's maximum context length is {max_model_len} tokens; the prompt has {len(ids)} "
                         f"and max_tokens is {max_tokens} ({len(ids) + max_tokens} in all); lower max_tokens "
                         f"to {max_model_len - len(ids)} or shorten the prompt")
    return max_tokens


class EngineDeadError(RuntimeError):
    """The engine lost a rank; it serves nothing more (a DP router restarts the replica)."""


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer | NullDetokenizer]
    metrics: RequestMetrics
    prompt_logprobs: list[dict | None] | None = None
    sent_tokens: list[int] = field(default_factory=list)  # per seq: tokens already reported (for deltas)
    pending_text: list[str] = field(default_factory=list)  # per seq: text not yet reported


class LLMEngine:
    def __init__(self, cfg: EngineConfig, progress: bool = True) -> None:
        self.cfg = cfg
        # skip_tokenizer_init: no tokenizer at all (token-id prompts, outputs without text, EOS from the configs)
        self.tokenizer = None if cfg.model.skip_tokenizer_init else load_tokenizer(cfg.model.tokenizer)
        self.eos_token_ids = eos_token_ids(cfg.model.model, cfg.model.hf_config, self.tokenizer)
        self.executor = make_executor(cfg, self.eos_token_ids, progress)
        num_blocks = self.executor.num_blocks
        capacity = num_blocks * cfg.cache.block_size
        if capacity < cfg.model.max_model_len:
            per_block = self.executor.block_bytes
            need = f" to at least {per_block * -(-cfg.model.max_model_len // cfg.cache.block_size) / 2**20:.1f}MiB"
            self.executor.shutdown()
            raise ConfigError(f"the KV cache holds {capacity} tokens ({num_blocks} blocks), fewer than one sequence "
                              f"of --max-model-len {cfg.model.max_model_len}; raise --kv-cache-memory{need} "
                              f"(or --gpu-memory-utilization) or lower --max-model-len to {capacity} or less")
        self.scheduler = Scheduler(cfg.scheduler, cfg.cache, num_blocks)
        self.requests: dict[str, _Request] = {}
        self.seqs: dict[int, Sequence] = {}
        self._seq_ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "max_in_flight_seen": 0}
        self._in_flight: deque[SchedulerOutput] = deque()
        self.dead: str | None = None  # set when a rank died: every request then fails with this message
        logger.info("engine ready: %d KV blocks of %d tokens", num_blocks, cfg.cache.block_size)

    # --- requests ------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if self.dead:
            raise EngineDeadError(self.dead)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = prompt_ids(self.tokenizer, prompt, prompt_token_ids, params)
        max_tokens = validate_request(ids, params, self.cfg.model.max_model_len, self.cfg.model.vocab_size)
        now = arrival_time if arrival_time is not None else time.monotonic()
        seqs, detoks = [], []
        for i in range(params.n):
            p = params.clone()
            if p.seed is not None and i:
                p.seed = params.seed + i  # n samples from one seed must differ
            seq = Sequence(seq_id=next(self._seq_ids), request_id=request_id, index=i, prompt_token_ids=ids,
                           params=p, max_tokens=max_tokens, eos_token_ids=self.eos_token_ids, arrival_time=now)
            seqs.append(seq)
            detoks.append(NullDetokenizer() if self.tokenizer is None else
                          IncrementalDetokenizer(self.tokenizer, ids, p.skip_special_tokens, p.stop,
                                                 p.include_stop_str_in_output, p.spaces_between_special_tokens))
        req = _Request(request_id, prompt, ids, seqs, detoks, RequestMetrics(arrival_time=now),
                       sent_tokens=[0] * len(seqs), pending_text=[""] * len(seqs))
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = []
        self.requests[request_id] = req
        for seq in seqs:
            self.seqs[seq.seq_id] = seq
            self.scheduler.add(seq)
        self.stats["prompt_tokens"] += len(ids)

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.abort(req.seqs)
        for seq in req.seqs:
            self.seqs.pop(seq.seq_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_stats(self) -> dict[str, float]:
        """Point-in-time engine state and cumulative counters (for metrics and the periodic stats log)."""
        sch, bm = self.scheduler, self.scheduler.block_manager
        return {"num_requests_running": len(sch.running), "num_requests_waiting": len(sch.waiting),
                "kv_cache_usage_perc": bm.usage, "num_preemptions": sch.num_preemptions,
                "prompt_tokens": self.stats["prompt_tokens"], "generation_tokens": self.stats["generation_tokens"],
                "steps": self.stats["steps"], "prefix_cache_queries": bm.prefix_cache_queries,
                "prefix_cache_hits": bm.prefix_cache_hits, "num_blocks": bm.num_total_blocks,
                "num_free_blocks": bm.num_free_blocks,
                **{f"executor_{k}": v for k, v in self.executor.stats().items() if k.startswith("stage")}}

    def expert_counts(self) -> dict[int, list[int]]:
        """MoE models: layer → tokens routed to each expert so far (the load imbalance users ask about); {} for
        dense models and once the engine has failed. Asks the ranks (collective_rpc), so call it between steps."""
        hf = self.cfg.model.hf_config
        if self.dead or not (hf.get("num_local_experts") or hf.get("num_experts")):
            return {}
        try:
            return self.executor.expert_counts()
        except ExecutorError as e:
            logger.warning("expert counts unavailable: %s", e)
            return {}

    @property
    def num_blocks(self) -> int:
        return self.executor.num_blocks

    # --- stepping ------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule one batch, run it, and return an output for every request that advanced.

        Failures are isolated: an ExecutorError (a rank died or raised) fails every request and marks the engine
        dead (`restart_executor` brings it back); any other exception (a CUDA OOM in the in-process worker, a
        kernel error, a bug while processing results) fails only the requests of the batches it hit, with an
        error output naming it, and the engine keeps serving (`fail_step`)."""
        try:
            # keep up to max_in_flight batches (disjoint sequences) in the pipeline, so every stage works at once
            while len(self._in_flight) < self.executor.max_in_flight:
                sched_out = self.scheduler.schedule(self.executor.max_in_flight)
                if not sched_out.seqs:
                    break
                self._in_flight.append(sched_out)  # before submit: a step that raises there fails this batch
                self.executor.submit(sched_out)
                self.stats["max_in_flight_seen"] = max(self.stats["max_in_flight_seen"], len(self._in_flight))
            if not self._in_flight:
                return []
            result = self.executor.collect()
        except ExecutorError as e:
            self._in_flight.clear()
            return self.fail_all(str(e))
        except Exception as e:  # noqa: BLE001 - the step's requests fail, the engine goes on
            return self.fail_step(e)
        sched_out = self._in_flight.popleft()
        try:
            return self.process_result(sched_out, result)
        except Exception as e:  # noqa: BLE001 - the ranks are fine: fail this batch's requests only
            return self.fail_step(e, [sched_out])

    def fail_step(self, exc: BaseException, batches: list[SchedulerOutput] | None = None) -> list[RequestOutput]:
        """A step raised `exc` (not an ExecutorError): finish the requests of `batches` (default: every batch in
        flight) with an error output naming it, free their blocks, and keep serving; the workers drop those
        sequences' state with the next step (finished_seq_ids). When nothing was in flight (scheduling raised),
        every request fails, so that no caller waits on a request that cannot advance. With ranks in other
        processes a step that raised on this side leaves their state unknown: that is an engine failure
        (`fail_all`; the offline LLM restarts its ranks, a core exits and is restarted)."""
        reason = f"engine step failed: {type(exc).__name__}: {' '.join(str(exc).split())}"
        logger.error("%s", reason, exc_info=exc)
        if batches is None:
            batches = list(self._in_flight)
            self._in_flight.clear()
            if self.cfg.parallel.executor != "uni":
                return self.fail_all(reason)
        seq_ids = {item.seq_id for b in batches for item in b.seqs}
        req_ids = {self.seqs[s].request_id for s in seq_ids if s in self.seqs}
        if not batches:
            req_ids = set(self.requests)
        return self._fail_requests([r for r in self.requests if r in req_ids], reason)

    def _fail_requests(self, request_ids: list[str], error: str) -> list[RequestOutput]:
        """Finish these requests with an error output each (their blocks freed, their state gone)."""
        outs = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            for seq in req.seqs:
                self.scheduler.finish(seq, "error")
            out = self._make_output(req)
            out.error = error
            outs.append(out)
        return outs

    def fail_all(self, reason: str) -> list[RequestOutput]:
        """A rank died: finish every request with an error (never leave a caller waiting)."""
        self.dead = reason
        logger.error("engine failed: %s", reason)
        return self._fail_requests(list(self.requests), f"engine failure: {reason}")

    def restart_executor(self) -> list[RequestOutput]:
        """Start the ranks afresh (after a rank failure, or whenever their state cannot be trusted): every request
        still here fails with an error output (returned), the executor is shut down and a new one built, with a
        fresh scheduler and block manager; `dead` is cleared. Raises (and stays dead) if the new ranks fail to
        start."""
        reason = self.dead or "the engine's ranks were restarted"
        outs = self._fail_requests(list(self.requests), f"engine failure: {reason}")
        self._in_flight.clear()
        self.dead = reason  # until the new executor is up
        old = self.executor
        try:
            old.shutdown()
        except Exception as e:  # noqa: BLE001 - the old ranks are being replaced anyway
            logger.warning("shutting down the failed executor: %s", e)
        logger.warning("restarting the engine's ranks (%s)", reason)
        self.executor = None  # type: ignore[assignment]  # an in-process worker's memory goes before the new one's
        import gc
        import torch
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        try:
            new = make_executor(self.cfg, self.eos_token_ids, False)
        except BaseException:
            self.executor = old  # shut down already; the engine stays dead (a later restart may succeed)
            raise
        num_blocks = new.num_blocks
        if num_blocks * self.cfg.cache.block_size < self.cfg.model.max_model_len:
            new.shutdown()
            self.executor = old
            raise ConfigError(f"after a restart the KV cache holds {num_blocks * self.cfg.cache.block_size} tokens, "
                              f"fewer than one sequence of --max-model-len {self.cfg.model.max_model_len}")
        self.executor = new
        self.scheduler = Scheduler(self.cfg.scheduler, self.cfg.cache, num_blocks)
        self.requests.clear()
        self.seqs.clear()
        self.dead = None
        logger.info("engine restarted: %d KV blocks of %d tokens", num_blocks, self.cfg.cache.block_size)
        return outs

    def process_result(self, sched_out: SchedulerOutput, result: ModelRunnerOutput) -> list[RequestOutput]:
        self.scheduler.on_step_done(sched_out, self.seqs)
        self.stats["steps"] += 1
        now = time.monotonic()
        touched: dict[str, _Request] = {}
        for seq_id, entries in result.prompt_logprobs.items():
            seq = self.seqs.get(seq_id)
            req = self.requests.get(seq.request_id) if seq is not None else None
            if req is not None and req.prompt_logprobs is not None and seq.index == 0 \
                    and len(req.prompt_logprobs) < len(req.prompt_token_ids):
                req.prompt_logprobs.extend(entries)
        for i, (seq_id, token) in enumerate(zip(result.seq_ids, result.token_ids)):
            seq = self.seqs.get(seq_id)
            if seq is None or seq.is_finished:
                continue  # aborted while the step ran
            req = self.requests[seq.request_id]
            seq.token_ids.append(token)
            if result.logprobs and result.logprobs[i] is not None:
                seq.logprobs.append(result.logprobs[i])
            if seq.first_token_time is None:
                seq.first_token_time = now
                if req.metrics.first_token_time is None:
                    req.metrics.first_token_time = now
            seq.last_token_time = now
            self.stats["generation_tokens"] += 1
            req.pending_text[seq.index] += req.detoks[seq.index].add_tokens([token])
            self._check_stop(seq, req.detoks[seq.index], token)
            touched[req.request_id] = req
        return [self._make_output(req) for req in touched.values()]

    def _check_stop(self, seq: Sequence, detok: IncrementalDetokenizer | NullDetokenizer, token: int) -> None:
        p = seq.params
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in seq.eos_token_ids:
                return self.scheduler.finish(seq, "stop")
            if token in (p.stop_token_ids or []):
                return self.scheduler.finish(seq, "stop", token)
            if detok.stop_reason is not None:
                return self.scheduler.finish(seq, "stop", detok.stop_reason)
        if n_out >= seq.max_tokens or seq.num_tokens >= self.cfg.model.max_model_len:
            self.scheduler.finish(seq, "length")

    def _make_output(self, req: _Request) -> RequestOutput:
        outs = []
        for seq, detok in zip(req.seqs, req.detoks):
            new_tokens = seq.output_token_ids[req.sent_tokens[seq.index]:]
            delta_text, req.pending_text[seq.index] = req.pending_text[seq.index], ""
            if seq.is_finished and detok.stop_reason is None:
                delta_text += detok.flush()  # release text held back for a possible stop string
            outs.append(CompletionOutput(
                index=seq.index, text=detok.output_text, token_ids=list(seq.output_token_ids),
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, text_delta=delta_text,
                token_ids_delta=new_tokens,
                logprobs_delta=seq.logprobs[req.sent_tokens[seq.index]:] if seq.params.logprobs is not None else []))
            req.sent_tokens[seq.index] = seq.num_output_tokens
        finished = all(s.is_finished for s in req.seqs)
        if finished:
            req.metrics.finished_time = time.monotonic()
            req.metrics.num_preemptions = sum(s.num_preemptions for s in req.seqs)
            self.requests.pop(req.request_id, None)
            for seq in req.seqs:
                self.seqs.pop(seq.seq_id, None)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished,
                             prompt_logprobs=req.prompt_logprobs, metrics=req.metrics)

    def shutdown(self) -> None:
        self.executor.shutdown()
