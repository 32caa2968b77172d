"""Performance model: a per-device roofline for each step plus alpha-beta costs of collectives.

A step on one pipeline stage takes max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth) plus
its communication: two ring all-reduces per layer over tp (after the attention output projection and
after the MLP), all-to-all dispatch and combine per MoE layer when experts span replicas (ep > tp),
an all-gather of vocab-parallel logits, and a send/recv of hidden states between stages.

Achievable fractions (docs/planner.md has the derivation):
- MEMORY_BW_EFFICIENCY 0.70: decode GEMVs reach ~70% of datasheet HBM bandwidth. Calibrated on
  gpt-fast's A100-80GB batch-1 numbers (Llama-2-7B at tp=1 reads 13.2 GB per token at 104.9 tok/s
  = 1.39 TB/s = 68% of 2.039 TB/s; Llama-2-70B at tp=2 reaches 73%).
- COMPUTE_EFFICIENCY 0.60: prefill GEMMs plus attention, norms and rotary reach ~60% of dense
  tensor-core peak (large cuBLAS BF16 GEMMs reach 70-80%; a whole transformer layer less).
- LINK_BW_EFFICIENCY 0.80: NCCL bus bandwidth is ~80% of the link's per-direction rate.
- Latency terms (alpha): COLLECTIVE_LAUNCH_S = 15 us per collective plus a hop latency per ring
  step (NVLink 1 us, so a batch-1 all-reduce costs 17 us at tp=2 and 29 us at tp=8). Both were
  fitted to the gpt-fast tensor-parallel rows (the residual after weight reads; 64 all-reduces per
  token for Llama-2-7B, 160 for Llama-2-70B). PCIe (3 us) and InfiniBand (6 us) hops are estimates
  from NCCL small-message latencies, not calibrated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shardserve.planner.hardware import Cluster
from shardserve.planner.memory import DTYPE_BYTES, ModelSpec, StageWeights, heads_per_device, kv_bytes_per_token, \
    stage_layers, stage_weights

MEMORY_BW_EFFICIENCY = 0.70
COMPUTE_EFFICIENCY = 0.60
LINK_BW_EFFICIENCY = 0.80
COLLECTIVE_LAUNCH_S = 15e-6
HOP_LATENCY_S = {"nvlink": 1e-6, "pcie": 3e-6, "ib": 6e-6}


@dataclass(frozen=True)
class Link:
    """One interconnect for the alpha-beta model."""

    name: str
    bandwidth: float  # bytes/s per direction, datasheet
    hop_s: float
    launch_s: float = COLLECTIVE_LAUNCH_S
    efficiency: float = LINK_BW_EFFICIENCY

    def all_reduce(self, n: int, nbytes: float) -> float:
        """Ring all-reduce: 2(n-1) steps, each rank moves 2(n-1)/n of the buffer."""
        if n <= 1:
            return 0.0
        return self.launch_s + 2 * (n - 1) * self.hop_s + 2 * (n - 1) / n * nbytes / (self.bandwidth * self.efficiency)

    def all_gather(self, n: int, nbytes_out: float) -> float:
        """Ring all-gather of an `nbytes_out` result: n-1 steps, each rank receives (n-1)/n of it."""
        if n <= 1:
            return 0.0
        return self.launch_s + (n - 1) * self.hop_s + (n - 1) / n * nbytes_out / (self.bandwidth * self.efficiency)

    def all_to_all(self, n: int, nbytes_per_rank: float) -> float:
        """Pairwise all-to-all: each rank sends (n-1)/n of its buffer, n-1 peers."""
        if n <= 1:
            return 0.0
        return self.launch_s + (n - 1) * self.hop_s + (n - 1) / n * nbytes_per_rank / (self.bandwidth * self.efficiency)

    def send_recv(self, nbytes: float) -> float:
        return self.launch_s + self.hop_s + nbytes / (self.bandwidth * self.efficiency)


def intra_node_link(cluster: Cluster, group: int) -> Link:
    """The link a group of `group` GPUs inside one node talks over."""
    gpu = cluster.gpu
    if cluster.interconnect == "ib":
        return Link("ib", gpu.network_bandwidth, HOP_LATENCY_S["ib"])
    if cluster.interconnect == "nvlink" and gpu.nvlink_bandwidth > 0 and group <= gpu.nvlink_group:
        return Link("nvlink", gpu.nvlink_bandwidth, HOP_LATENCY_S["nvlink"])
    return Link("pcie", gpu.pcie_bandwidth, HOP_LATENCY_S["pcie"])


def network_link(cluster: Cluster) -> Link:
    return Link("ib", cluster.gpu.network_bandwidth, HOP_LATENCY_S["ib"])


def pp_hops_across_nodes(tp: int, pp: int, dp: int, gpus_per_node: int) -> int:
    """Worst number of stage-to-stage hops that leave a node (ranks: TP innermost, then PP, then DP)."""
    worst = 0
    for d in range(dp):
        base = d * pp * tp
        nodes = [(base + s * tp) // gpus_per_node for s in range(pp)]
        worst = max(worst, sum(a != b for a, b in zip(nodes, nodes[1:])))
    return worst


@dataclass
class LayoutCost:
    """Roofline and communication model of one (tp, pp, dp, ep) layout of a model on a cluster."""

    spec: ModelSpec
    cluster: Cluster
    tp: int
    pp: int
    dp: int
    ep: int
    dtype: str = "bf16"
    kv_dtype: str = "bf16"
    vocab_parallel: bool = True  # False models engines that replicate embedding and head (gpt-fast)
    memory_bw_efficiency: float = MEMORY_BW_EFFICIENCY
    compute_efficiency: float = COMPUTE_EFFICIENCY
    stages: list[range] = field(init=False)
    weights: list[StageWeights] = field(init=False)

    def __post_init__(self) -> None:
        wbytes = DTYPE_BYTES[self.dtype]
        self.stages = stage_layers(self.spec.num_layers, self.pp)
        self.weights = [
            stage_weights(self.spec, layers, self.tp, self.ep, i == 0, i == self.pp - 1, wbytes, self.vocab_parallel)
            for i, layers in enumerate(self.stages)
        ]
        moe = set(self.spec.moe_layers)
        self.moe_counts = [sum(1 for i in layers if i in moe) for layers in self.stages]
        self.act_bytes = 2
        self.tp_link = intra_node_link(self.cluster, self.tp)
        cross = pp_hops_across_nodes(self.tp, self.pp, self.dp, self.cluster.gpus_per_node)
        self.pp_link = network_link(self.cluster) if cross else intra_node_link(self.cluster, 2)
        ep_ranks = self.ep * self.pp  # an ep group spans ep/tp replicas of pp*tp ranks each
        self.ep_link = (network_link(self.cluster) if ep_ranks > self.cluster.gpus_per_node
                        else intra_node_link(self.cluster, self.ep))

    # --- one step of one stage ---------------------------------------------------------------
    def stage_time(self, stage: int, tokens: int, attended: float, logits_rows: int,
                   kv_read_tokens: float) -> float:
        """Seconds for `stage` to process `tokens` new tokens of one replica.

        attended: sum over new tokens of the context each attends to (attention FLOPs);
        logits_rows: rows of the head computed (decode: every token; prefill: one per sequence);
        kv_read_tokens: cached tokens whose K/V are read from memory.
        """
        spec, w, layers = self.spec, self.weights[stage], self.stages[stage]
        n_layers, n_moe = len(layers), self.moe_counts[stage]
        kv_tok = kv_bytes_per_token(spec, DTYPE_BYTES[self.kv_dtype], self.tp, n_layers)
        flops = 2 * tokens * w.dense_params + 2 * logits_rows * w.head_params
        flops += 4 * attended * heads_per_device(spec, self.tp) * spec.head_dim * n_layers  # the most loaded rank
        bytes_read = w.dense + w.final_norm + (w.head if logits_rows else 0.0)
        bytes_read += tokens * spec.hidden_size * 2 if w.embedding else 0.0  # embedding rows
        bytes_read += (kv_read_tokens + tokens) * kv_tok  # read the cache, write the new entries
        if n_moe:
            k, e = spec.experts_per_token, spec.num_experts
            routed = tokens * max(1, self.ep // self.tp)  # tokens the ep group routes
            bytes_read += w.experts * (1 - (1 - k / e) ** routed)
            flops += 2 * tokens * k * 3 * spec.hidden_size * spec.moe_intermediate_size * n_moe / self.tp
        gpu = self.cluster.gpu
        compute = flops / (gpu.flops_for(self.dtype) * self.compute_efficiency)
        memory = bytes_read / (gpu.memory_bandwidth * self.memory_bw_efficiency)
        return max(compute, memory) + self.stage_comm(stage, tokens, logits_rows, n_layers, n_moe)

    def stage_comm(self, stage: int, tokens: int, logits_rows: int, n_layers: int, n_moe: int) -> float:
        hidden_bytes = tokens * self.spec.hidden_size * self.act_bytes
        t = 0.0
        if self.tp > 1:
            moe_a2a = self.ep > self.tp
            reduces = 2 * n_layers - (n_moe if moe_a2a else 0)
            t += reduces * self.tp_link.all_reduce(self.tp, hidden_bytes)
            if stage == self.pp - 1 and self.vocab_parallel and logits_rows:
                t += self.tp_link.all_gather(self.tp, logits_rows * self.spec.vocab_size * 4)
        if n_moe and self.ep > self.tp:
            per_rank = math.ceil(tokens / self.tp) * self.spec.experts_per_token * self.spec.hidden_size * 2
            t += 2 * n_moe * self.ep_link.all_to_all(self.ep, per_rank)
        if stage < self.pp - 1:
            t += self.pp_link.send_recv(hidden_bytes)
        return t

    # --- request-level predictions --------------------------------------------------------------
    def decode_step_s(self, seqs_per_replica: int, context: float) -> float:
        """Time between two tokens of one sequence (TPOT) with `seqs_per_replica` sequences decoding.

        With pp the replica's sequences are split into min(seqs, pp) micro-batches that flow through
        the stages; every sequence advances one token per round of pp stage-steps.
        """
        micro = max(1, min(seqs_per_replica, self.pp))
        mb = math.ceil(seqs_per_replica / micro)
        per_stage = max(self.stage_time(s, mb, mb * context, mb, mb * context) for s in range(self.pp))
        return self.pp * per_stage

    def prefill_s(self, prompt_tokens: int, chunk_tokens: int) -> float:
        """Time to first token of one `prompt_tokens` prompt on an idle replica (chunked prefill).

        Chunks flow through the stages as in a flow shop: chunk c enters stage s once stage s-1 has
        finished it and stage s has finished chunk c-1.
        """
        chunks = max(1, math.ceil(prompt_tokens / chunk_tokens))
        size = prompt_tokens / chunks
        done = [0.0] * chunks  # finish time of each chunk on the previous stage
        for s in range(self.pp):
            prev = 0.0
            for c in range(chunks):
                prefix = c * size
                t = self.stage_time(s, math.ceil(size), size * (prefix + size / 2),
                                    1 if c == chunks - 1 else 0, prefix)
                prev = max(prev, done[c]) + t
                done[c] = prev
        return done[-1]
