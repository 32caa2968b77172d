"""Pipeline stage partitioning: which layers each stage holds (even, explicit, device map, or automatic).

The first stage always holds the embedding and the last stage the final norm and LM head; a stage may hold zero
decoder layers only if it is one of those two (a device map can put the embedding alone on stage 0)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardserve.config import ConfigError


def even_partition(num_layers: int, pp_size: int) -> list[int]:
    """Layers per stage, as even as possible; leftovers go to the middle stages first, then the first stage (an
    embedding lookup is cheap), and the last stage (which also runs the LM head) last."""
    if pp_size < 1:
        raise ConfigError(f"pipeline-parallel size must be >= 1, got {pp_size}")
    if num_layers < pp_size:
        raise ConfigError(f"cannot split {num_layers} layers over {pp_size} pipeline stages (each needs >= 1 layer); "
                          f"use --pipeline-parallel-size {num_layers} or less")
    base, extra = divmod(num_layers, pp_size)
    counts = [base] * pp_size
    order = list(range(1, pp_size - 1)) + [0, pp_size - 1]
    for i in order[:extra]:
        counts[i] += 1
    return counts


def layer_ranges(counts: list[int]) -> list[tuple[int, int]]:
    """[start, end) per stage from layers-per-stage counts."""
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def check_partition(counts: list[int], num_layers: int, pp_size: int) -> list[int]:
    if len(counts) != pp_size:
        raise ConfigError(f"the partition {counts} has {len(counts)} stages but --pipeline-parallel-size is {pp_size}")
    if any(c < 0 for c in counts):
        raise ConfigError(f"the partition {counts} has a negative layer count")
    if sum(counts) != num_layers:
        raise ConfigError(f"the partition {counts} sums to {sum(counts)} layers but the model has {num_layers}")
    for i, c in enumerate(counts):
        holds_other = (i == 0) or (i == pp_size - 1)  # embedding / LM head
        if c == 0 and not holds_other or c == 0 and pp_size == 1:
            raise ConfigError(f"stage {i} of the partition {counts} is empty (no layers, no embedding, no LM head)")
    return counts


def parse_layer_partition(text: str, num_layers: int, pp_size: int) -> list[int]:
    """'10,12,10' → [10, 12, 10], validated."""
    try:
        counts = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ConfigError(f"--pp-layer-partition {text!r}: write layer counts per stage, e.g. 10,12,10") from None
    return check_partition(counts, num_layers, pp_size)


_LAYERS_KEY = re.compile(r"^model\.layers\.(\d+)(?:-(\d+))?$")


def parse_device_map(spec: str | dict[str, Any], num_layers: int, pp_size: int) -> list[int]:
    """A transformers/accelerate-style device map (inline JSON, a JSON file, or a dict), e.g.
    {"model.embed_tokens": 0, "model.layers.0-3": 1, "model.layers.4-7": 2, "lm_head": 3} → [0, 4, 4, 0]."""
    if isinstance(spec, str):
        path = Path(spec)
        text = path.read_text() if not spec.lstrip().startswith("{") and path.is_file() else spec
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"device map is neither a JSON object nor a JSON file: {e}") from None
    if not isinstance(spec, dict):
        raise ConfigError("a device map must be a JSON object of module name → stage")
    owner: dict[int, int] = {}
    for key, stage in spec.items():
        if not isinstance(stage, int) or not 0 <= stage < pp_size:
            raise ConfigError(f"device map entry {key!r}: stage {stage!r} is not in [0, {pp_size})")
        m = _LAYERS_KEY.match(key)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo or hi >= num_layers:
                raise ConfigError(f"device map entry {key!r} names layers outside 0-{num_layers - 1}")
            for i in range(lo, hi + 1):
                if i in owner:
                    raise ConfigError(f"device map places layer {i} twice")
                owner[i] = stage
        elif key in ("model.embed_tokens", "model.embed_tokens.weight"):
            if stage != 0:
                raise ConfigError(f"device map puts the embedding on stage {stage}; it must be on stage 0")
        elif key in ("lm_head", "lm_head.weight", "model.norm"):
            if stage != pp_size - 1:
                raise ConfigError(f"device map puts {key} on stage {stage}; it must be on the last stage {pp_size - 1}")
        else:
            raise ConfigError(f"device map key {key!r} is not understood; use model.embed_tokens, "
                              "model.layers.A-B (or model.layers.N), model.norm and lm_head")
    missing = [i for i in range(num_layers) if i not in owner]
    if missing:
        raise ConfigError(f"device map misses layer(s) {_ranges(missing)}")
    stages = [owner[i] for i in range(num_layers)]
    if stages != sorted(stages):
        raise ConfigError("device map must place layers on non-decreasing stages (layer i+1 on the same stage as "
                          "layer i or a later one)")
    return check_partition([stages.count(s) for s in range(pp_size)], num_layers, pp_size)


def _ranges(nums: list[int]) -> str:
    out, start = [], nums[0]
    for a, b in zip(nums, nums[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


@dataclass
class StageCosts:
    """Per-token compute and memory of the pieces of a model, for the automatic split."""
    layer_flops: float          # per token, one decoder layer
    head_flops: float           # per token, final norm + LM head
    layer_weight_bytes: int
    embed_bytes: int
    head_bytes: int             # 0 when tied to the embedding and pp == 1
    layer_kv_bytes: int         # KV bytes one layer keeps for the sequences budgeted
    activation_bytes: int       # peak activations of one prefill chunk
    cap_bytes: int              # per-device memory cap


def stage_memory(c: StageCosts, layers: int, first: bool, last: bool) -> int:
    return (layers * (c.layer_weight_bytes + c.layer_kv_bytes) + c.activation_bytes
            + (c.embed_bytes if first else 0) + (c.head_bytes if last else 0))


def stage_compute(c: StageCosts, layers: int, last: bool) -> float:
    return layers * c.layer_flops + (c.head_flops if last else 0.0)


def auto_partition(num_layers: int, pp_size: int, c: StageCosts) -> list[int]:
    """Minimise the slowest stage's compute (layers + LM head) subject to every stage fitting the memory cap,
    by dynamic programming over contiguous splits. Refuses with the shortfall when no split fits."""
    INF = float("inf")
    # best[s][n]: (max stage compute, counts) placing the first n layers on stages 0..s
    best: list[list[tuple[float, list[int]] | None]] = [[None] * (num_layers + 1) for _ in range(pp_size)]
    for n in range(num_layers + 1):
        if _fits(c, n, True, pp_size == 1) and (n > 0 or pp_size > 1):
            best[0][n] = (stage_compute(c, n, pp_size == 1), [n])
    for s in range(1, pp_size):
        last = s == pp_size - 1
        for n in range(num_layers + 1):
            cand: tuple[float, list[int]] | None = None
            for k in range(0 if last else 1, n + 1):  # k layers on stage s (a middle stage needs >= 1)
                prev = best[s - 1][n - k]
                if prev is None or not _fits(c, k, False, last):
                    continue
                score = max(prev[0], stage_compute(c, k, last))
                if cand is None or score < cand[0]:
                    cand = (score, prev[1] + [k])
            best[s][n] = cand
    result = best[pp_size - 1][num_layers]
    if result is None or result[0] == INF:
        need = max(stage_memory(c, -(-num_layers // pp_size), True, True), 1)
        raise ConfigError(f"the model does not fit {pp_size} stages under a per-device cap of "
                          f"{c.cap_bytes / 2**30:.2f} GiB (a balanced stage needs about {need / 2**30:.2f} GiB with "
                          "embedding and head); raise --max-per-device-memory, lower --max-model-len, or use more "
                          "pipeline stages")
    return check_partition(result[1], num_layers, pp_size)


def _fits(c: StageCosts, layers: int, first: bool, last: bool) -> bool:
    return stage_memory(c, layers, first, last) <= c.cap_bytes


def stage_costs(model_cfg: Any, tp: int, cap_bytes: int, chunk_tokens: int) -> StageCosts:
    """Per-layer weights/KV/FLOPs of this model on one TP rank, from the planner's exact parameter counts.
    The KV budget per layer is one full --max-model-len sequence (the least a stage must hold to serve)."""
    from shardserve.planner.memory import ModelSpec, activation_bytes, kv_bytes_per_token, stage_weights
    spec = ModelSpec.from_config(model_cfg.hf_config)
    scale = model_cfg.dtype.itemsize / 2  # the planner counts 16-bit weights
    layer = stage_weights(spec, range(0, 1), tp, 1, False, False, 2)
    first = stage_weights(spec, range(0, 0), tp, 1, True, False, 2)
    last = stage_weights(spec, range(0, 0), tp, 1, False, True, 2)
    return StageCosts(
        layer_flops=2.0 * layer.dense_params, head_flops=2.0 * last.head_params,
        layer_weight_bytes=int(layer.total * scale), embed_bytes=int(first.total * scale),
        head_bytes=int(last.total * scale),
        layer_kv_bytes=kv_bytes_per_token(spec, model_cfg.dtype.itemsize, tp, 1) * model_cfg.max_model_len,
        activation_bytes=int(activation_bytes(spec, tp, model_cfg.dtype.itemsize, True, chunk_tokens)),
        cap_bytes=cap_bytes)


def device_memory_bytes(device: str, ranks_on_host: int) -> int:
    """Memory of one device: the GPU's, or on CPU the host's RAM shared by its ranks."""
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_properties(device).total_memory
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, ranks_on_host)


def resolve_partition(cfg: Any) -> list[int]:
    """Layers per stage for an EngineConfig, from --pp-layer-partition or --pp-partition even|auto|DEVICE_MAP."""
    par, model = cfg.parallel, cfg.model
    pp, n = par.pipeline_parallel_size, model.num_layers
    if par.pp_layer_partition:
        return parse_layer_partition(par.pp_layer_partition, n, pp)
    mode = (par.pp_partition or "even").strip()
    if mode == "even":
        return even_partition(n, pp)
    if mode == "auto":
        device_bytes = device_memory_bytes(cfg.device, par.world_size)
        cap = par.max_per_device_memory
        if cap is None:
            cap_bytes = int(device_bytes * (cfg.cache.gpu_memory_utilization if cfg.device.startswith("cuda") else 1))
        elif cap <= 1.0:
            cap_bytes = int(device_bytes * cap)
        else:
            cap_bytes = int(cap)
        costs = stage_costs(model, par.tensor_parallel_size, cap_bytes, cfg.scheduler.max_num_batched_tokens)
        return auto_partition(n, pp, costs)
    return parse_device_map(mode, n, pp)
