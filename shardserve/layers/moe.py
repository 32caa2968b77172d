"""Mixture-of-experts layers: top-k router, experts grouped by expert, TP-expert / expert-parallel spread, counts.

Both layouts keep the hidden states replicated on every rank of the stage (attention is tensor-parallel, so each
rank already holds every token). Each rank runs the router on all tokens (same input, same weights: the same
routing everywhere), computes the contribution of the expert weights it holds, and one all-reduce over the group
sums the partial outputs — see docs/moe.md for the bytes this moves and why it beats an all-to-all here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.layers.activation import get_act_fn
from shardserve.layers.lazy_tensor import LazyTensor
from shardserve.layers.linear import ReplicatedLinear

PLACEMENTS = ("linear", "round_robin")


# --------------------------------------------------------------------------------------------- routing

def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts (float32), keep the top k, optionally renormalise them to sum to 1.

    router_logits [tokens, experts] -> (weights [tokens, top_k] float32, expert ids [tokens, top_k] int64).
    Mixtral always renormalises; Qwen2-MoE / Qwen3-MoE do when `norm_topk_prob` is set.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # [tokens, experts]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [tokens, top_k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


# --------------------------------------------------------------------------------------------- placement

def local_experts(num_experts: int, ep_size: int, ep_rank: int, placement: str = "linear") -> list[int]:
    """Global ids of the experts EP rank `ep_rank` owns, in local order.

    linear: rank r owns [r * E/ep, (r+1) * E/ep); round_robin: rank r owns r, r + ep, r + 2 ep, ...
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"expert placement {placement!r} is not supported; use one of {PLACEMENTS}")
    if num_experts % ep_size:
        raise ValueError(f"{num_experts} experts are not divisible by the expert-parallel size {ep_size}")
    per_rank = num_experts // ep_size
    if placement == "linear":
        return list(range(ep_rank * per_rank, (ep_rank + 1) * per_rank))
    return list(range(ep_rank, num_experts, ep_size))


def expert_map(num_experts: int, owned: list[int]) -> torch.Tensor:
    """[experts] int64: global expert id -> local index on this rank, -1 where another rank owns it."""
    m = torch.full((num_experts,), -1, dtype=torch.int64)
    m[torch.tensor(owned, dtype=torch.int64)] = torch.arange(len(owned), dtype=torch.int64)
    return m


# --------------------------------------------------------------------------------------------- grouped compute

def grouped_expert_forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                           topk_local_ids: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """This rank's share of sum_k weight_k * expert_{id_k}(x), computed grouped by expert.

    x [tokens, hidden]; w13 [local experts, 2 * inter, hidden] (gate rows, then up rows); w2 [local experts,
    hidden, inter]; topk_weights [tokens, top_k]; topk_local_ids [tokens, top_k]: local expert index, or -1 for an
    expert held by another rank (skipped). The (token, k) slots are sorted by expert so each expert runs one
    matmul over all of its tokens; an expert that receives no token costs nothing. Returns [tokens, hidden].
    """
    top_k = topk_local_ids.shape[1]
    num_local = w13.shape[0]
    out = torch.zeros_like(x)  # [tokens, hidden]
    flat = topk_local_ids.reshape(-1)  # [tokens * top_k]
    keys = torch.where(flat < 0, num_local, flat)  # remote experts sort last
    order = torch.argsort(keys, stable=True)  # [tokens * top_k] slot indices grouped by expert
    counts = torch.bincount(keys, minlength=num_local + 1)[:num_local].tolist()  # tokens per local expert
    n = sum(counts)
    if n == 0:
        return out
    slots = order[:n]  # [n] the local slots, expert by expert
    token_idx = slots // top_k  # [n]
    xs = x.index_select(0, token_idx)  # [n, hidden] tokens in expert order
    ys = torch.empty_like(xs)  # [n, hidden]
    start = 0
    for e, c in enumerate(counts):
        if c:
            h = act(F.linear(xs[start:start + c], w13[e]))  # [c, inter]
            ys[start:start + c] = F.linear(h, w2[e])  # [c, hidden]
            start += c
    scaled = ys * topk_weights.reshape(-1)[slots].unsqueeze(-1)  # [n, hidden], float32 weights
    out.index_add_(0, token_idx, scaled.to(out.dtype))
    return out


# --------------------------------------------------------------------------------------------- expert weights

@dataclass(frozen=True)
class ExpertWeight:
    """A parsed checkpoint expert tensor: `module` is the experts module's name, `expert` None for a fused
    [experts, ...] tensor; `shard_id` is w1 (gate), w3 (up), w2 (down) or w13 (fused gate|up)."""
    module: str
    expert: int | None
    shard_id: str


_PER_EXPERT = re.compile(r"^(?P<module>.+\.experts)\.(?P<expert>\d+)\."
                         r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(?P<module>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_SHARD_IDS = {"w1": "w1", "gate_proj": "w1", "w3": "w3", "up_proj": "w3", "w2": "w2", "down_proj": "w2",
              "gate_up_proj": "w13"}


def parse_expert_weight(name: str) -> ExpertWeight | None:
    """Recognise both checkpoint forms of routed experts: per-expert `experts.{e}.{w1|w2|w3|gate_proj|up_proj|
    down_proj}.weight` (what transformers writes to safetensors) and fused `experts.{gate_up_proj|down_proj}`
    (its in-memory 3-d form). Anything else (router, shared expert, attention) returns None."""
    if m := _PER_EXPERT.match(name):
        return ExpertWeight(m["module"], int(m["expert"]), _SHARD_IDS[m["proj"]])
    if m := _FUSED.match(name):
        return ExpertWeight(m["module"], None, _SHARD_IDS[m["proj"]])
    return None


class FusedMoE(nn.Module):
    """The routed experts of one MoE layer on this rank.

    tensor-parallel experts (shard.ep None): every expert, intermediate dim split over the tp group;
    expert parallelism (shard.ep set): num_experts / ep whole experts, chosen by `shard.expert_placement`.
    Parameters: w13_weight [local experts, 2 * local inter, hidden], w2_weight [local experts, hidden, local inter].
    `forward` returns this rank's partial sum; `reduce` sums partials over the group (once per layer).
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 shard: Any, dtype: torch.dtype, hidden_act: str = "silu", layer_idx: int = 0) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        if top_k > num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) exceeds the number of experts ({num_experts})")
        ep, tp = getattr(shard, "ep", None), shard.tp
        if ep is not None and ep.world_size > 1:
            if tp is not None and tp.world_size != ep.world_size:
                raise ValueError(f"expert-parallel size {ep.world_size} must equal the tensor-parallel size "
                                 f"{tp.world_size} (the ep group is the stage's tp group)")
            self.group = ep
            self.owned = local_experts(num_experts, ep.world_size, ep.rank_in_group, shard.expert_placement)
            self.tp_size, self.tp_rank = 1, 0
        else:
            self.group = tp if tp is not None and tp.world_size > 1 else None
            self.owned = list(range(num_experts))
            self.tp_size, self.tp_rank = (tp.world_size, tp.rank_in_group) if self.group is not None else (1, 0)
            if intermediate_size % self.tp_size:
                raise ValueError(f"tensor-parallel experts: the expert intermediate size ({intermediate_size}) is "
                                 f"not divisible by the tensor-parallel size ({self.tp_size}); use a tp size that "
                                 "divides it, or --enable-expert-parallel")
        self.intermediate_size = intermediate_size
        inter = intermediate_size // self.tp_size
        self.inter_per_rank = inter
        n_local = len(self.owned)
        self.w13_weight = nn.Parameter(torch.empty(n_local, 2 * inter, hidden_size, dtype=dtype), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(n_local, hidden_size, inter, dtype=dtype), requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader
        self.register_buffer("expert_map", expert_map(num_experts, self.owned), persistent=False)
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self.act_fn = get_act_fn(hidden_act)
        self._local_index = {e: i for i, e in enumerate(self.owned)}
        self._loaded: set[tuple[int, str]] = set()

    def owns(self, expert: int) -> bool:
        return expert in self._local_index

    # --- loading: narrow first, so a rank reads only its experts / its slice of each expert ---------------------
    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, shard_id: str, expert: int) -> None:
        """Copy checkpoint tensor `loaded` ([inter, hidden] for w1/w3, [hidden, inter] for w2, a leading
        dim of 1 allowed) of global expert `expert` into this rank's slot, narrowed to this rank's slice."""
        if expert not in self._local_index:
            raise ValueError(f"expert {expert} is not held by this rank (holds {self.owned})")
        e = self._local_index[expert]
        inter = self.inter_per_rank
        if shard_id in ("w1", "w3"):
            src = loaded.narrow(-2, self.tp_rank * inter, inter)  # [(1,) inter_local, hidden]
            dst = param.data[e].narrow(0, 0 if shard_id == "w1" else inter, inter)
        elif shard_id == "w2":
            src = loaded.narrow(-1, self.tp_rank * inter, inter)  # [(1,) hidden, inter_local]
            dst = param.data[e]
        else:
            raise ValueError(f"unknown expert shard id {shard_id!r}")
        t = src.load()
        t = t.reshape(t.shape[-2:])  # drop the fused form's expert dim of 1
        if tuple(t.shape) != tuple(dst.shape):
            raise ValueError(f"expert {expert} {shard_id}: checkpoint shard {tuple(t.shape)} vs parameter "
                             f"{tuple(dst.shape)}")
        dst.copy_(t)
        self._loaded.add((expert, shard_id))

    def load_expert(self, loaded: LazyTensor, shard_id: str, expert: int) -> str:
        """Load one per-expert tensor; returns the parameter name it filled (relative to this module)."""
        param = self.w2_weight if shard_id == "w2" else self.w13_weight
        param.weight_loader(param, loaded, shard_id, expert)
        return "w2_weight" if shard_id == "w2" else "w13_weight"

    def load_fused(self, loaded: LazyTensor, shard_id: str) -> str:
        """Load a fused [experts, 2 * inter, hidden] (w13) or [experts, hidden, inter] (w2) tensor: only the
        owned experts' slices are read."""
        full_inter = self.intermediate_size
        for expert in self.owned:
            one = loaded.narrow(0, expert, 1)  # [1, ...]
            if shard_id == "w13":
                self.load_expert(one.narrow(1, 0, full_inter), "w1", expert)
                self.load_expert(one.narrow(1, full_inter, full_inter), "w3", expert)
            else:
                self.load_expert(one, "w2", expert)
        return "w2_weight" if shard_id == "w2" else "w13_weight"

    def check_loaded(self) -> None:
        missing = [(e, s) for e in self.owned for s in ("w1", "w3", "w2") if (e, s) not in self._loaded]
        if missing:
            raise ValueError(f"layer {self.layer_idx}: checkpoint is missing expert weights {missing[:6]}")

    # --- compute -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden], router_logits [tokens, experts] -> this rank's partial output [tokens, hidden]."""
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)  # [tokens, top_k] each
        return self.apply_routing(x, weights, ids)

    def apply_routing(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Experts for a given routing (global expert ids [tokens, top_k]); counts every routed slot."""
        self.expert_counts += torch.bincount(topk_ids.reshape(-1), minlength=self.num_experts)
        local_ids = self.expert_map[topk_ids]  # [tokens, top_k], -1 where another rank owns the expert
        return grouped_expert_forward(x, self.w13_weight, self.w2_weight, topk_weights, local_ids, self.act_fn)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's partial output [tokens, hidden] (identity on one rank)."""
        return self.group.all_reduce(partial) if self.group is not None else partial


class SparseMoeBlock(nn.Module):
    """Router (`gate`), routed experts and an optional shared expert with a sigmoid gate (Qwen2-MoE); one
    all-reduce per block. `shared_expert` must return this rank's partial sum (its row-parallel reduce off)."""

    def __init__(self, experts: FusedMoE, dtype: torch.dtype, shared_expert: nn.Module | None = None,
                 shared_expert_gate: bool = False) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(experts.hidden_size, experts.num_experts, bias=False, dtype=dtype)
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = ReplicatedLinear(experts.hidden_size, 1, bias=False, dtype=dtype) \
            if shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(x)  # [tokens, experts]
        out = self.experts(x, router_logits)  # [tokens, hidden], this rank's part
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # [tokens, hidden], this rank's part
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared  # [tokens, 1] gate, linear in parts
            out = out + shared
        return self.experts.reduce(out)


# --------------------------------------------------------------------------------------------- statistics

def collect_expert_counts(model: nn.Module) -> dict[int, list[int]]:
    """{layer index: tokens routed to each expert (all experts, global), summed over steps since the last reset}.

    Counts are global without communication: every rank of a stage routes every token. Under pipeline
    parallelism each stage reports its own layers; merge the stages' dicts.
    """
    return {m.layer_idx: m.expert_counts.tolist() for m in model.modules() if isinstance(m, FusedMoE)}


def reset_expert_counts(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, FusedMoE):
            m.expert_counts.zero_()
