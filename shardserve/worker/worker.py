"""One rank: its device, its shard of the model, its KV cache, and the step loop body (recv → forward → send/sample)."""
from __future__ import annotations

import importlib
import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from shardserve.config import EngineConfig
from shardserve.distributed.parallel_state import collective_stats
from shardserve.layers.attention import build_attention_backend
from shardserve.layers.moe import FusedMoE, collect_expert_counts, reset_expert_counts
from shardserve.layers.tp_split import head_partition
from shardserve.models.base import ModelShard
from shardserve.models.loader import load_model
from shardserve.step import ModelRunnerOutput, ScheduledSeq, SchedulerOutput
from shardserve.utils.trace import Tracer
from shardserve.worker.cuda_graph import MAX_GRAPH_BATCH, Capture, DecodeGraphs, capture_cuda, capture_sizes
from shardserve.worker.kv_cache import KVCache
from shardserve.worker.model_runner import ModelRunner

if TYPE_CHECKING:
    from shardserve.distributed.parallel_state import ParallelState

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # per rank, when --kv-cache-memory is not given


def gpu_kv_budget(total: int, utilization: float, peak_allocated: int, reserved: int, free: int) -> int:
    """Bytes of the device the KV cache may take: `utilization` of the device, minus what this process's torch
    tensors peaked at in the profiling forward (weights + activations), minus memory that torch's allocator does not
    see (CUDA context, NCCL and cuBLAS buffers, other processes on the GPU): used - reserved, used = total - free."""
    outside_torch = max(0, total - free - reserved)
    return int(total * utilization - peak_allocated - outside_torch)


class Worker:
    def __init__(self, cfg: EngineConfig, pstate: ParallelState, layer_range: tuple[int, int],
                 eos_token_ids: list[int], progress: bool = False) -> None:
        self.cfg = cfg
        self.pstate = pstate
        self.device = cfg.device
        if self.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(self.device))
        torch.manual_seed(cfg.model.seed)
        pp = pstate.pp
        self.shard = ModelShard(tp=pstate.tp if pstate.tp.world_size > 1 else None,
                                start_layer=layer_range[0], end_layer=layer_range[1],
                                is_first_stage=pp.is_first_rank, is_last_stage=pp.is_last_rank,
                                ep=pstate.tp if cfg.parallel.enable_expert_parallel and pstate.tp.world_size > 1
                                else None, expert_placement=cfg.parallel.expert_placement)
        self.is_driver = pp.is_last_rank and pstate.tp.rank_in_group == 0  # returns sampled tokens
        t0 = time.perf_counter()
        self.backend = build_attention_backend(cfg.model, self.device, pstate)
        self.model, self.read_counter = load_model(cfg.model, self.shard, self.backend, self.device,
                                                   progress=progress)
        self.load_time_s = time.perf_counter() - t0
        self.runner: ModelRunner | None = None
        self.kv_cache: KVCache | None = None
        self.num_blocks = 0
        self.eos_token_ids = eos_token_ids
        self.stage_timings = {"compute_s": 0.0, "sample_s": 0.0, "send_s": 0.0, "recv_s": 0.0, "steps": 0}
        self.stage = pp.rank_in_group
        self.tracer = Tracer(bool(cfg.parallel.trace_file), pid=pstate.rank,
                             process_name=f"rank {pstate.rank} (stage {pp.rank_in_group}, tp {pstate.tp.rank_in_group})")
        self._pending_sends: list = []
        self.has_moe = any(isinstance(m, FusedMoE) for m in self.model.modules())

    # --- KV cache ----------------------------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        m = self.cfg.model
        per_token = m.kv_bytes_per_token(self.pstate.tp.world_size, self.shard.num_local_layers,
                                         self.pstate.tp.rank_in_group)  # this rank's KV heads (may be uneven)
        return per_token * self.cfg.cache.block_size

    def determine_num_blocks(self) -> int:
        cache = self.cfg.cache
        if cache.num_gpu_blocks_override:
            return cache.num_gpu_blocks_override
        if self.device.startswith("cuda"):
            budget = self._profile_gpu_budget()
        else:
            budget = cache.kv_cache_memory or DEFAULT_CPU_KV_CACHE_BYTES
        return max(0, budget // max(1, self.kv_block_bytes()) - self.use_graphs)  # one block: graph padding

    def _profile_gpu_budget(self) -> int:
        """Free device memory for the KV cache after a dummy forward of the largest step, followed on the last
        stage by its largest logits and sampling work (`_profile_sampling`), so torch's peak covers both."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        n = min(self.cfg.scheduler.max_num_batched_tokens, self.cfg.model.max_model_len)
        self._dummy_forward(n)
        torch.cuda.synchronize()
        if self.has_moe:  # the profiling run must not show up in the per-expert counts
            reset_expert_counts(self.model)
        free, total = torch.cuda.mem_get_info(self.device)
        return gpu_kv_budget(total, self.cfg.cache.gpu_memory_utilization, torch.cuda.max_memory_allocated(),
                             torch.cuda.memory_reserved(), free)

    def _dummy_forward(self, num_tokens: int) -> None:
        bs = self.cfg.cache.block_size
        nblocks = (num_tokens + bs - 1) // bs
        caches = self._allocate(nblocks).layers
        runner = ModelRunner(self.model, caches, bs, self.device, [], self.cfg.model.vocab_size)
        item = ScheduledSeq(seq_id=-1, token_ids=[0] * num_tokens, start_pos=0, block_table=list(range(nblocks)),
                            do_sample=False)
        inputs = runner.prepare_inputs(SchedulerOutput(seqs=[item], finished_seq_ids=[]))
        intermediate = None
        if not self.shard.is_first_stage:
            h = torch.zeros(num_tokens, self.cfg.model.hidden_size, dtype=self.cfg.model.dtype, device=self.device)
            intermediate = {"hidden_states": h, "residual": h.clone()}
        hidden = runner.forward(inputs, intermediate)
        if self.shard.is_last_stage:
            self._profile_sampling(hidden)
        del caches, runner, hidden

    def _profile_sampling(self, hidden: torch.Tensor) -> None:
        """Run the last stage's post-forward work of a step at its largest, so that the profiled peak includes it
        (ModelRunner.sample: the LM head returns fp32 [rows x vocab] logits):

        - prompt logprobs over every token of the step: `compute_logits` of all `num_tokens` rows (a chunk of a
          prompt that asked for prompt_logprobs), then `compute_prompt_logprobs` (its log-softmax chunks of
          `_PROMPT_LOGPROBS_CHUNK_ELEMS`), with the most top logprobs a request may ask for;
        - sampling `max_num_seqs` rows (at most one per token of the step) with every option that allocates
          [rows x vocab] on: a greedy row among random ones, repetition/frequency/presence penalties over a
          `max_model_len`-token history, a full top-p sort, min-p and logprobs.

        Every TP rank of the last stage runs this (the LM head all-gathers). The RNGs are left as they were."""
        from shardserve.layers.sampler import Sampler, SamplingMetadata, compute_prompt_logprobs
        from shardserve.sampling_params import MAX_LOGPROBS, SamplingParams
        n = int(hidden.shape[0])
        rows = max(1, min(self.cfg.scheduler.max_num_seqs, n))
        cuda = str(self.device).startswith("cuda")
        rng_devices = [torch.device(self.device).index or 0] if cuda else []
        with torch.inference_mode(), torch.random.fork_rng(devices=rng_devices):
            logits = self.model.compute_logits(hidden)  # [n, vocab]: a whole chunk of prompt positions
            targets = torch.zeros(n, dtype=torch.int64, device=logits.device)
            compute_prompt_logprobs(logits, targets, MAX_LOGPROBS)
            del logits, targets
            logits = self.model.compute_logits(hidden[list(range(n - rows, n))])  # [rows, vocab], as in sample()
            random = SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                                    frequency_penalty=0.5, presence_penalty=0.5, logprobs=MAX_LOGPROBS)
            params = [SamplingParams(temperature=0.0, logprobs=MAX_LOGPROBS)] + [random] * (rows - 1)
            meta = SamplingMetadata.build(params, [[0]] * rows, [[0]] * rows, None, [], logits.shape[-1],
                                          logits.device)
            history = max(1, self.cfg.model.max_model_len)  # the longest prompt + output token history
            meta.prompt_token_ids = torch.zeros(rows, history, dtype=torch.int64, device=logits.device)
            meta.output_token_ids = torch.zeros(rows, history, dtype=torch.int64, device=logits.device)
            Sampler()(logits, meta)
            del logits, meta

    def _allocate(self, num_blocks: int) -> KVCache:
        m = self.cfg.model
        kv_heads = head_partition(m.num_heads, m.num_kv_heads, self.pstate.tp.world_size,
                                  self.pstate.tp.rank_in_group).kv_count  # this rank's share (tp_split)
        return KVCache(self.shard.num_local_layers, num_blocks, self.cfg.cache.block_size, kv_heads, m.head_dim,
                       m.dtype, self.device, self.backend.kv_cache_shape)

    def init_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache (plus, with CUDA graphs, one block no sequence owns, for the padding rows) and
        capture the decode graphs."""
        self.num_blocks = num_blocks
        self.kv_cache = self._allocate(num_blocks + self.use_graphs)
        caches = self.kv_cache.layers
        self.runner = ModelRunner(self.model, caches, self.cfg.cache.block_size, self.device,
                                  self.eos_token_ids, self.cfg.model.vocab_size, self.shard.is_last_stage)
        if self.use_graphs:
            self.runner.graphs = self.capture_graphs(caches, scratch_block=num_blocks)

    @property
    def use_graphs(self) -> bool:
        """CUDA graphs for decode: on a GPU, unless --enforce-eager, with a capturable attention backend, no MoE
        layer (its expert counts sync with the host) and NCCL (or no) tensor-parallel collectives."""
        tp = self.pstate.tp
        return (self.device.startswith("cuda") and not self.cfg.runner.enforce_eager and self.backend.supports_graphs
                and not self.has_moe and (tp.world_size == 1 or tp.backend == "nccl"))

    def capture_graphs(self, caches: list[torch.Tensor], scratch_block: int, capture: Capture | None = None):
        m, sched = self.cfg.model, self.cfg.scheduler
        limit = min(self.cfg.runner.max_graph_batch_size or sched.max_num_seqs, sched.max_num_seqs, MAX_GRAPH_BATCH)
        t0 = time.perf_counter()
        before = torch.cuda.memory_reserved(self.device) if self.device.startswith("cuda") else 0
        graphs = DecodeGraphs(self.model, caches, self.cfg.cache.block_size, m.max_model_len, scratch_block,
                              capture_sizes(limit), torch.device(self.device), m.hidden_size, m.dtype,
                              first_stage=self.shard.is_first_stage, capture=capture or capture_cuda)
        extra = (torch.cuda.memory_reserved(self.device) - before) / 2**20 if before else 0.0
        logger.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s, %.0f MiB of graph memory beyond "
                    "--gpu-memory-utilization", len(graphs.sizes), limit, time.perf_counter() - t0, extra)
        return graphs

    # --- a step ------------------------------------------------------------------------------------------------
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput | None:
        """Run this rank's part of one step. A stage that is not the last sends hidden states (and every earlier
        stage's timings) to the next stage without blocking, so it can start the next micro-batch at once."""
        runner = self.runner
        assert runner is not None, "init_cache first"
        runner.update_states(sched)
        inputs = runner.prepare_inputs(sched)
        pp, tm, step = self.pstate.pp, self.stage_timings, sched.step_id
        intermediate, upstream = None, {}
        if not self.shard.is_first_stage:
            t0 = time.perf_counter()
            with self.tracer.span("recv", tid=1, step=step):
                intermediate = pp.recv_tensor_dict(pp.rank_in_group - 1)
            upstream = intermediate.pop("stage_timings")
            tm["recv_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        with self.tracer.span("compute", step=step, tokens=sched.num_tokens):
            hidden = runner.forward(inputs, intermediate)
        tm["compute_s"] += time.perf_counter() - t0
        tm["steps"] += 1
        timings = {**upstream, str(self.stage): {**tm, **collective_stats()}}  # comm_* only with timing on
        if not self.shard.is_last_stage:
            t0 = time.perf_counter()
            with self.tracer.span("send", tid=1, step=step):
                for h in self._pending_sends:  # the previous micro-batch's send must be done before reuse
                    h.wait()
                hidden["stage_timings"] = timings
                self._pending_sends = pp.isend_tensor_dict(hidden, pp.rank_in_group + 1)
            tm["send_s"] += time.perf_counter() - t0
            return None
        # every TP rank of the last stage joins the LM head's all-gather (and samples identically); one returns
        t0 = time.perf_counter()
        with self.tracer.span("sample", step=step):
            result = runner.sample(inputs, hidden, step)
        tm["sample_s"] += time.perf_counter() - t0
        timings[str(self.stage)] = {**tm, **collective_stats()}
        if not self.is_driver:
            return None
        for key, t in timings.items():
            result.timings.update({f"stage{key}_{k}": v for k, v in t.items()})
        return result

    # --- called by the executor's collective_rpc (results travel msgpack-encoded) ------------------------------
    def call(self, method: str, args: tuple | list) -> Any:
        """Run one collective_rpc call here: a public Worker method, or "package.module:function"(worker, *args)."""
        if ":" in method:
            module, name = method.split(":", 1)
            return getattr(importlib.import_module(module), name)(self, *args)
        fn = getattr(self, method, None) if not method.startswith("_") and method != "call" else None
        if not callable(fn):
            raise AttributeError(f"the worker has no public method {method!r}")
        return fn(*args)

    @property
    def rank(self) -> int:
        return self.pstate.rank

    def load_info(self) -> dict[str, int]:
        """What loading this rank's shard cost: bytes read from the checkpoint and milliseconds."""
        return {"bytes_read": self.read_counter.bytes_read, "load_ms": int(self.load_time_s * 1e3)}

    def expert_counts(self) -> dict[int, list[int]]:
        """MoE layer → tokens routed to each expert so far (this stage's layers; global over the tp group)."""
        return collect_expert_counts(self.model) if self.has_moe else {}

    def trace_events(self) -> list[dict]:
        """This rank's Chrome-trace events so far (empty unless --trace-file)."""
        return list(self.tracer.events) if self.tracer.enabled else []

    def read_kv_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Whole blocks of every local layer, on the CPU (layout: worker/kv_cache.py)."""
        assert self.kv_cache is not None, "init_cache first"
        return self.kv_cache.read_blocks(block_ids).cpu()

    def write_kv_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        assert self.kv_cache is not None, "init_cache first"
        self.kv_cache.write_blocks(block_ids, blocks)

    def close(self) -> None:
        for h in self._pending_sends:
            h.wait()
