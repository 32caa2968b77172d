"""Engine configuration: validated dataclasses for the model, the parallel layout, the KV cache and the scheduler."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shardserve.executor.factory import check_executor, default_executor
from shardserve.layers.tp_split import check_heads, head_partition, max_heads_per_rank

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the flag and a valid alternative."""


def parse_dtype(dtype: str | torch.dtype, hf_config: dict[str, Any]) -> torch.dtype:
    """Resolve `--dtype auto|float32|bfloat16|float16` against the checkpoint's declared dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        declared = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
        return _DTYPES.get(str(declared).replace("torch.", ""), torch.float32)
    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; use one of: auto, float32, bfloat16, float16")
    return _DTYPES[dtype]


def parse_size(value: str | int | float | None) -> int | None:
    """Parse '2GiB', '512MiB', '1.5G', '1e9' or a plain number of bytes."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", str(value), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"cannot parse size {value!r}; write e.g. 2GiB, 512MiB or a number of bytes")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if (binary or unit) else 1
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit]
    return int(num * base**power)


@dataclass
class ModelConfig:
    """What the model is: the HF directory, its config.json, the dtype and the context length served."""
    model: str
    dtype: torch.dtype
    hf_config: dict[str, Any]
    max_model_len: int
    tokenizer: str
    seed: int = 0
    skip_tokenizer_init: bool = False  # no tokenizer: token-id prompts only, outputs without text (EngineArgs sets it)

    @classmethod
    def from_path(cls, model: str, dtype: str | torch.dtype = "auto", max_model_len: int | None = None,
                  tokenizer: str | None = None, seed: int = 0) -> "ModelConfig":
        from shardserve.models.gguf_loader import gguf_config, is_gguf
        path = Path(model)
        cfg_file = path / "config.json" if path.is_dir() else path
        if is_gguf(model):  # a .gguf file, or a directory holding one (and no safetensors)
            try:
                hf_config = gguf_config(path)
            except ValueError as e:
                raise ConfigError(f"--model {model!r}: {e}") from e
        elif not cfg_file.is_file():
            raise ConfigError(f"--model {model!r}: no config.json found; pass a Hugging Face model directory "
                              "or a .gguf file (run `shardserve make-tiny-model DIR` to create one)")
        else:
            hf_config = json.loads(cfg_file.read_text())
        derived = _derived_max_len(hf_config)
        if max_model_len is None:
            max_model_len = derived
        elif max_model_len > derived:
            raise ConfigError(f"--max-model-len {max_model_len} exceeds the model's maximum context of {derived} "
                              f"(max_position_embeddings); use --max-model-len {derived} or less")
        elif max_model_len < 1:
            raise ConfigError(f"--max-model-len must be >= 1, got {max_model_len}")
        return cls(model=str(path), dtype=parse_dtype(dtype, hf_config), hf_config=hf_config,
                   max_model_len=max_model_len, tokenizer=tokenizer or str(path), seed=seed)

    @property
    def architecture(self) -> str:
        archs = self.hf_config.get("architectures") or []
        return archs[0] if archs else ""

    @property
    def num_layers(self) -> int:
        return int(self.hf_config["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.hf_config["num_attention_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.hf_config.get("num_key_value_heads") or self.num_heads)

    @property
    def hidden_size(self) -> int:
        return int(self.hf_config["hidden_size"])

    @property
    def head_dim(self) -> int:
        return int(self.hf_config.get("head_dim") or self.hidden_size // self.num_heads)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])

    def kv_bytes_per_token(self, tp_size: int = 1, num_layers: int | None = None, tp_rank: int | None = None) -> int:
        """Bytes of K and V one token occupies on tp rank `tp_rank` (None: the rank holding the most KV heads; an
        uneven split gives ranks different KV heads, tp_split.head_partition; replicated when tp > num_kv_heads)."""
        kv_per_rank = max_heads_per_rank(self.num_heads, self.num_kv_heads, tp_size)[1] if tp_rank is None else \
            head_partition(self.num_heads, self.num_kv_heads, tp_size, tp_rank).kv_count
        layers = self.num_layers if num_layers is None else num_layers
        return 2 * layers * kv_per_rank * self.head_dim * self.dtype.itemsize


def _derived_max_len(hf_config: dict[str, Any]) -> int:
    return int(hf_config.get("max_position_embeddings") or hf_config.get("max_sequence_length") or 2048)


@dataclass
class ParallelConfig:
    """The layout: world = dp × pp × tp ranks, TP innermost."""
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # a name in executor/factory.py; None = uni for world 1, else mp
    collective_timeout_s: float = 60.0
    enable_expert_parallel: bool = False  # MoE: whole experts per rank (ep size = tp size) instead of TP slices
    expert_placement: str = "linear"      # "linear" | "round_robin"
    pp_partition: str = "even"            # "even" | "auto" | a device map (inline JSON or a JSON file)
    pp_layer_partition: str | None = None  # explicit layers per stage, e.g. "10,12,10"
    max_per_device_memory: float | None = None  # auto partition cap: a fraction of device memory, or bytes
    max_micro_batches: int | None = None  # batches in flight (default: pp size)
    trace_file: str | None = None         # write a Chrome trace of every rank's compute/send/recv spans
    disable_custom_all_reduce: bool = False  # every collective through NCCL/gloo: no CUDA-IPC or shared-memory path
    tp_overlap_chunks: int = 1  # row-parallel layers: GEMM + all-reduce in up to N overlapped row blocks (1 = off)
    rank_stall_timeout_s: float = 10.0  # a rank whose heartbeat thread is silent this long has stalled

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.max_per_device_memory, str):
            text = self.max_per_device_memory.strip()
            self.max_per_device_memory = float(text) if re.fullmatch(r"[0-9.]+", text) and float(text) <= 1 \
                else float(parse_size(text))
        if not 1 <= self.tp_overlap_chunks <= 64:
            raise ConfigError(f"--tp-overlap-chunks must be 1..64 (1 = no overlap), got {self.tp_overlap_chunks}")
        if not float(self.rank_stall_timeout_s) > 0:
            raise ConfigError(f"--rank-stall-timeout-s must be > 0 seconds, got {self.rank_stall_timeout_s}")
        if self.max_micro_batches is not None and self.max_micro_batches < 1:
            raise ConfigError(f"--max-micro-batches must be >= 1, got {self.max_micro_batches}")
        if self.expert_placement not in ("linear", "round_robin"):
            raise ConfigError(f"--expert-placement {self.expert_placement!r} is not supported; "
                              "use 'linear' or 'round_robin'")
        problem = check_executor(self.distributed_executor_backend, self.world_size)
        if problem:
            raise ConfigError(problem)

    @property
    def world_size(self) -> int:
        """Ranks of one engine core (one DP replica)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def executor(self) -> str:
        return self.distributed_executor_backend or default_executor(self.world_size)


@dataclass
class CacheConfig:
    """Paged KV cache: block size, how much memory it may take, and prefix caching."""
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes (CPU); None = a default share of the host
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two >= 1, got {self.block_size}; try 16")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        self.kv_cache_memory = parse_size(self.kv_cache_memory)
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"--kv-cache-memory must be positive, got {self.kv_cache_memory}")


@dataclass
class SchedulerConfig:
    """Continuous batching limits: tokens per step, sequences per step, chunked prefill."""
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    enable_chunked_prefill: bool = True
    max_waiting_requests: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"--max-num-batched-tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be >= 1, got {self.max_num_seqs}")


@dataclass
class RunnerConfig:
    """How decode steps run on a GPU: replayed CUDA graphs per padded batch size, unless --enforce-eager."""
    enforce_eager: bool = False
    max_graph_batch_size: int | None = None   # largest captured decode batch; default --max-num-seqs (<= 512)

    def __post_init__(self) -> None:
        if self.max_graph_batch_size is not None and self.max_graph_batch_size < 1:
            raise ConfigError(f"--max-graph-batch-size must be >= 1, got {self.max_graph_batch_size}")


@dataclass
class EngineConfig:
    """Everything one engine core needs."""
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "cpu"
    runner: RunnerConfig = field(default_factory=RunnerConfig)

    def __post_init__(self) -> None:
        validate_layout(self.model, self.parallel, self.device)
        if not self.scheduler.enable_chunked_prefill and \
                self.scheduler.max_num_batched_tokens < self.model.max_model_len:
            raise ConfigError("without chunked prefill --max-num-batched-tokens must be >= --max-model-len "
                              f"({self.model.max_model_len}); raise it or enable chunked prefill")


def validate_layout(model: ModelConfig, par: ParallelConfig, device: str) -> None:
    """Refuse layouts that cannot work, with the reason and a layout that would."""
    tp, pp = par.tensor_parallel_size, par.pipeline_parallel_size
    heads, kv = model.num_heads, model.num_kv_heads
    # heads need not divide by tp: they are split by KV group, unevenly if need be (layers/tp_split.py); the MLP
    # and the vocabulary split unevenly too. Only more ranks than query heads cannot be split.
    try:
        check_heads(heads, kv, tp)
    except ValueError as exc:
        raise ConfigError(f"--tensor-parallel-size {tp}: {exc}") from None
    inter = model.hf_config.get("intermediate_size")
    if inter and tp > int(inter):
        raise ConfigError(f"--tensor-parallel-size {tp} exceeds intermediate_size ({inter}): every rank needs at "
                          f"least one MLP column; use at most {inter}")
    if pp > model.num_layers:
        raise ConfigError(f"--pipeline-parallel-size {pp} exceeds the model's {model.num_layers} layers; "
                          f"use at most {model.num_layers}")
    experts = model.hf_config.get("num_local_experts") or model.hf_config.get("num_experts")
    if experts and not par.enable_expert_parallel:
        cfg = model.hf_config
        for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
            size = cfg.get(key) or (cfg.get("intermediate_size") if key == "moe_intermediate_size" else None)
            if size and size % tp:
                raise ConfigError(f"--tensor-parallel-size {tp}: the experts' {key} ({size}) is not divisible by "
                                  f"{tp}; pick a tp that divides it, or add --enable-expert-parallel to keep "
                                  "experts whole")
    if par.enable_expert_parallel:
        if not experts:
            raise ConfigError("--enable-expert-parallel needs a mixture-of-experts model; this one has no experts")
        if experts % tp:
            ok = [d for d in range(1, min(experts, heads) + 1) if experts % d == 0]
            raise ConfigError(f"--enable-expert-parallel with -tp {tp}: {experts} experts are not divisible by the "
                              f"expert-parallel size {tp}; valid sizes: {', '.join(map(str, ok))}")
    world = tp * pp
    if device.startswith("cuda"):
        n = torch.cuda.device_count()
        if world > n:
            raise ConfigError(f"tp × pp = {world} ranks need {world} GPUs but {n} are visible; "
                              f"lower --tensor-parallel-size/--pipeline-parallel-size or use --device cpu")
    else:
        import os
        cores = os.cpu_count() or 1
        if world > 8 * cores:
            raise ConfigError(f"tp × pp = {world} CPU ranks on {cores} cores would thrash; use at most {8 * cores}")


def resolve_device(device: str) -> str:
    """`auto` → cuda when available, else cpu; anything else must be cpu or cuda[:N]."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" or re.fullmatch(r"cuda(:\d+)?", device):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {device} requested but CUDA is not available; use --device cpu")
        return device
    raise ConfigError(f"--device {device!r} is not supported; use auto, cpu or cuda")


def engine_config_to_dict(cfg: EngineConfig) -> dict[str, Any]:
    """JSON-safe form of an EngineConfig (sent to worker processes; the HF config is re-read from disk)."""
    from dataclasses import asdict
    m = cfg.model
    return {"model": {"model": m.model, "dtype": str(m.dtype).replace("torch.", ""), "max_model_len": m.max_model_len,
                      "tokenizer": m.tokenizer, "seed": m.seed},
            "parallel": asdict(cfg.parallel), "cache": asdict(cfg.cache), "scheduler": asdict(cfg.scheduler),
            "device": cfg.device, "runner": asdict(cfg.runner)}


def engine_config_from_dict(d: dict[str, Any]) -> EngineConfig:
    m = d["model"]
    return EngineConfig(model=ModelConfig.from_path(m["model"], m["dtype"], m["max_model_len"], m["tokenizer"],
                                                    m["seed"]),
                        parallel=ParallelConfig(**d["parallel"]), cache=CacheConfig(**d["cache"]),
                        scheduler=SchedulerConfig(**d["scheduler"]), device=d["device"],
                        runner=RunnerConfig(**d.get("runner", {})))
