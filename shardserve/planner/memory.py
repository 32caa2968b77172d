"""Memory arithmetic: parameter counts from an HF config, per-device weights, KV cache and activations.

Counts are exact for the supported architectures (every matrix, bias, norm, embedding and head; MoE
routers, experts and shared experts) and equal `transformers`' own parameter count. Sharding follows
the shardserve layers (layers/tp_split.py): attention heads split by KV group, K/V projections
replicated when tp > num_kv_heads, MLP columns split over tp, all possibly unevenly, and a rank is
sized by the largest shard (it sets the pace and the memory); vocab-parallel embedding and head,
experts split over max(tp, ep), norms and routers replicated; with pp each stage holds its layers,
the first the embedding, the last the head (a tied embedding is held by both when pp > 1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from shardserve.layers.tp_split import max_heads_per_rank, max_shard
from shardserve.planner.hardware import GiB, PlannerError
from shardserve.planner.model_presets import canonical_model_name, get_model_preset, model_preset_names

DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")

# CUDA context, cuBLAS/NCCL workspaces, CUDA-graph pools and allocator fragmentation, per device.
RUNTIME_OVERHEAD_BYTES = 2 * GiB
# Prefill is chunked (vLLM's max_num_batched_tokens); activations are sized for one chunk.
PREFILL_CHUNK_TOKENS = 8192
# Most sequences sampled in one step (vLLM's max_num_seqs default); sizes the fp32 logits buffer.
MAX_NUM_SEQS = 256


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer, normalised across HF model types."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (dense layers of MoE models too)
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = ()  # indices of the layers whose MLP is a mixture of experts

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and bool(self.moe_layers)

    @classmethod
    def from_config(cls, config: dict, name: str | None = None) -> "ModelSpec":
        """Read the fields the planner needs from an HF config.json dict."""
        mt = config.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise PlannerError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        try:
            hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
            vocab, inter = config["vocab_size"], config["intermediate_size"]
        except KeyError as exc:
            raise PlannerError(f"model config lacks {exc.args[0]!r}") from None
        head_dim = config.get("head_dim") or hidden // heads
        experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
        moe_layers: tuple[int, ...] = ()
        if mt == "mixtral":
            moe_layers = tuple(range(layers))
        elif mt in ("qwen2_moe", "qwen3_moe") and experts > 0:
            step, dense_only = config.get("decoder_sparse_step", 1) or 1, set(config.get("mlp_only_layers") or [])
            moe_layers = tuple(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
        attention_bias = bool(config.get("attention_bias", False))
        qkv_bias = {"qwen2": True, "qwen2_moe": bool(config.get("qkv_bias", True))}.get(mt, attention_bias)
        o_bias = attention_bias and mt in ("llama", "qwen3", "qwen3_moe")
        return cls(
            name=name or config.get("_name_or_path") or mt,
            model_type=mt,
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=inter,
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(config.get("mlp_bias", False)) and mt == "llama",
            qk_norm=mt in ("qwen3", "qwen3_moe"),
            num_experts=experts if moe_layers else 0,
            experts_per_token=int(config.get("num_experts_per_tok", 0)) if moe_layers else 0,
            moe_intermediate_size=inter if mt == "mixtral" else int(config.get("moe_intermediate_size") or 0),
            shared_expert_intermediate_size=int(config.get("shared_expert_intermediate_size") or 0)
            if mt == "qwen2_moe" else 0,
            moe_layers=moe_layers,
        )


def load_model_config(source: str) -> tuple[dict, str]:
    """Resolve `--model`: a directory holding config.json, a config.json path, or a preset name."""
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise PlannerError(f"{source!r} is a directory without a config.json")
    if path.is_file():
        try:
            return json.loads(path.read_text()), path.parent.name or source
        except (OSError, json.JSONDecodeError) as exc:
            raise PlannerError(f"cannot read model config {str(path)!r}: {exc}") from None
    canonical = canonical_model_name(source)
    if canonical is None:
        raise PlannerError(f"--model {source!r} is neither a directory, a config.json, nor a preset; "
                           f"presets: {', '.join(model_preset_names())}")
    return get_model_preset(canonical), canonical


# --- parameter inventory -----------------------------------------------------------------------
# Each tensor is (numel, shard, quantized). shard says how it splits over a stage's ranks, sized for the rank
# holding the largest shard when the split is uneven:
#   "q": query heads (q/o projections), by KV group   "kv": K/V slice, replicated when tp > kv heads
#   "mlp": dense MLP columns, ceil(inter / tp)        "shared": shared-expert columns, ceil(size / tp)
#   "tp": numel / tp                                  "rep": replicated on every rank
#   "expert": numel / max(tp, ep)
# quantized: stored at the weight dtype (decoder-layer matrices); others stay 16-bit.
Tensor = tuple[int, str, bool]


def layer_tensors(spec: ModelSpec, layer: int) -> list[Tensor]:
    """Every parameter of decoder layer `layer`."""
    h, d = spec.hidden_size, spec.head_dim
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    out: list[Tensor] = [(h * q, "q", True), (2 * h * kv, "kv", True), (q * h, "q", True), (2 * h, "rep", False)]
    if spec.qkv_bias:
        out += [(q, "q", False), (2 * kv, "kv", False)]
    if spec.o_bias:
        out.append((h, "rep", False))
    if spec.qk_norm:
        out.append((2 * d, "rep", False))
    if layer in spec.moe_layers:
        out.append((spec.num_experts * h, "rep", False))  # router
        out.append((spec.num_experts * 3 * h * spec.moe_intermediate_size, "expert", True))
        if spec.shared_expert_intermediate_size:
            out.append((3 * h * spec.shared_expert_intermediate_size, "shared", True))
            out.append((h, "rep", False))  # shared_expert_gate
    else:
        out.append((3 * h * spec.intermediate_size, "mlp", True))
        if spec.mlp_bias:
            out += [(2 * spec.intermediate_size, "mlp", False), (h, "rep", False)]
    return out


def total_params(spec: ModelSpec) -> int:
    """Parameter count of the whole model, a tied embedding counted once."""
    layers = sum(n for i in range(spec.num_layers) for n, _, _ in layer_tensors(spec, i))
    embed = spec.vocab_size * spec.hidden_size
    return layers + embed * (1 if spec.tie_word_embeddings else 2) + spec.hidden_size


def active_params(spec: ModelSpec) -> int:
    """Parameters touched per token: experts counted at experts_per_token / num_experts."""
    moe_total = sum(spec.num_experts * 3 * spec.hidden_size * spec.moe_intermediate_size for _ in spec.moe_layers)
    active = moe_total * spec.experts_per_token // max(spec.num_experts, 1)
    return total_params(spec) - moe_total + active


def _local(numel: int, shard: str, spec: ModelSpec, tp: int, ep: int) -> float:
    if shard == "tp":
        return numel / tp
    if shard == "q":
        return numel / spec.num_heads * heads_per_device(spec, tp)
    if shard == "kv":
        return numel / spec.num_kv_heads * kv_heads_per_device(spec, tp)
    if shard == "mlp":
        return numel / spec.intermediate_size * max_shard(spec.intermediate_size, tp)
    if shard == "shared":
        size = spec.shared_expert_intermediate_size
        return numel / size * max_shard(size, tp)
    if shard == "expert":
        return numel / max(tp, ep)
    return numel


def _max_heads(spec: ModelSpec, tp: int) -> tuple[int, int]:
    """(query heads, KV heads) of the most loaded rank (tp_split: by KV group, possibly uneven). A layout the engine
    refuses (tp > heads) is sized as if every rank held at least one of each."""
    try:
        return max_heads_per_rank(spec.num_heads, spec.num_kv_heads, tp)
    except ValueError:
        return max(1, math.ceil(spec.num_heads / tp)), max(1, math.ceil(spec.num_kv_heads / tp))


def heads_per_device(spec: ModelSpec, tp: int) -> int:
    """Query heads of the most loaded rank: num_heads / tp when it divides by KV group, else more (9 heads over
    3 KV heads at tp 2: 6 on one rank, 3 on the other)."""
    return _max_heads(spec, tp)[0]


def kv_heads_per_device(spec: ModelSpec, tp: int) -> int:
    """KV heads of the most loaded rank: ceil(num_kv_heads / tp), or 1 (replicated) when tp > num_kv_heads."""
    return _max_heads(spec, tp)[1]


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Split layers over pp stages as vLLM does: even, remainder to the stages before the last."""
    sizes = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        sizes[-i] += 1
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out


@dataclass(frozen=True)
class StageWeights:
    """Bytes of one rank of one pipeline stage, split the way the cost model reads them."""

    dense: float  # attention, dense MLP, shared experts, norms, routers
    experts: float  # routed experts held by this rank
    embedding: float  # vocab-parallel embedding slice (first stage; read one row per token)
    head: float  # lm_head slice (last stage; read in full every step)
    final_norm: float
    dense_params: float  # parameters behind `dense` (FLOPs: 2 per parameter per token)
    head_params: float

    @property
    def total(self) -> float:
        return self.dense + self.experts + self.embedding + self.head + self.final_norm


def stage_weights(spec: ModelSpec, layers: range, tp: int, ep: int, first: bool, last: bool,
                  weight_bytes: int, vocab_parallel: bool = True) -> StageWeights:
    """Per-rank weight bytes of the stage holding `layers` (16-bit for unquantised tensors)."""
    dense = experts = dense_params = 0.0
    for layer in layers:
        for numel, shard, quantized in layer_tensors(spec, layer):
            local = _local(numel, shard, spec, tp, ep)
            size = local * (weight_bytes if quantized else 2)
            if shard == "expert":
                experts += size
            else:
                dense += size
                dense_params += local
    rows = math.ceil(spec.vocab_size / tp) if vocab_parallel else spec.vocab_size
    vocab_bytes = rows * spec.hidden_size * 2
    embedding = vocab_bytes if first else 0.0
    head = vocab_bytes if last else 0.0
    if spec.tie_word_embeddings and first and last:
        embedding = 0.0  # one shared matrix, read in full as the head
    return StageWeights(dense, experts, embedding, head, spec.hidden_size * 2.0 if last else 0.0,
                        dense_params, head / 2)


def kv_bytes_per_token(spec: ModelSpec, kv_bytes: int, tp: int = 1, layers: int | None = None) -> int:
    """K and V bytes one token occupies on one rank holding `layers` layers (all, by default)."""
    n = spec.num_layers if layers is None else layers
    return 2 * n * kv_heads_per_device(spec, tp) * spec.head_dim * kv_bytes


def activation_bytes(spec: ModelSpec, tp: int, act_bytes: int, last: bool,
                     chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> float:
    """Peak activation memory of one prefill chunk on one rank (inference: one layer live at a time).

    Residual stream, normed input, attention and MLP outputs (4 x hidden); local q/k/v; the MLP's
    gate_up and activated intermediate (3 x local width; top-k experts plus shared expert for MoE);
    the last stage adds fp32 logits for up to MAX_NUM_SEQS sampled rows.
    """
    t = chunk_tokens
    qkv = (heads_per_device(spec, tp) + 2 * kv_heads_per_device(spec, tp)) * spec.head_dim
    dense_mlp = 3 * max_shard(spec.intermediate_size, tp)
    if spec.is_moe:
        mlp = 3 * (spec.experts_per_token * spec.moe_intermediate_size + spec.shared_expert_intermediate_size) / tp
        mlp = max(mlp, dense_mlp if len(spec.moe_layers) < spec.num_layers else 0)
    else:
        mlp = dense_mlp
    per_token = (4 * spec.hidden_size + qkv + mlp) * act_bytes
    logits = min(t, MAX_NUM_SEQS) * math.ceil(spec.vocab_size / tp) * 4 if last else 0
    return t * per_token + logits
