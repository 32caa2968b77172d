"""How tensor parallelism splits a model over tp ranks when the sizes do not divide: the one place that owns the
arithmetic (layers, the KV cache, config validation and the planner all read it; no torch here).

Sizes (MLP width, plain column/row-parallel layers): `split_sizes(n, tp)` is balanced with the larger shares
first (7 over 2 is [4, 3], 100 over 3 is [34, 33, 33]); rank r holds the contiguous range `shard_range(n, tp, r)`.
The row-parallel all-reduce is unchanged: every rank's partial product has the full output size.

Attention heads (`head_partition`) are split by KV group, so a rank's query heads only ever read KV heads it holds
(group = num_heads / num_kv_heads query heads per KV head):

- tp <= num_kv_heads: the KV heads are split by `split_sizes(num_kv_heads, tp)` and each rank takes the query
  heads of its KV heads. 9 heads / 3 KV heads at tp 2: rank 0 holds KV heads 0-1 with query heads 0-5, rank 1
  KV head 2 with query heads 6-8.
- tp > num_kv_heads: the ranks are split over the KV heads by `split_sizes(tp, num_kv_heads)` (contiguous ranks per
  KV head); each rank holds exactly one KV head (replicated on that KV head's ranks) and those ranks split its group
  of query heads by `split_sizes(group, ranks)`. 9 / 3 at tp 4: ranks 0-1 hold KV head 0 with query heads 0-1 and
  2, rank 2 KV head 1 with 3-5, rank 3 KV head 2 with 6-8.

In both cases the ranks' query heads are contiguous and in rank order, so o_proj's row-parallel input slice of
rank r is [q_start * head_dim, (q_start + q_count) * head_dim). When the sizes divide, this is the usual even split.
The only layout that cannot be split is more ranks than query heads (`ValueError`). The largest shard sets the
pace (and the KV-cache size): `max_heads_per_rank`.
"""
from __future__ import annotations

from typing import NamedTuple


def split_sizes(n: int, tp: int) -> list[int]:
    """n units over tp ranks: balanced, the larger shares first ([4, 3] for 7 over 2); some may be 0 if n < tp."""
    if tp < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {tp}")
    base, extra = divmod(n, tp)
    return [base + 1 if r < extra else base for r in range(tp)]


def shard_range(n: int, tp: int, rank: int) -> tuple[int, int]:
    """(start, size) of rank's contiguous share of n units under `split_sizes`."""
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is outside a tensor-parallel group of {tp}")
    base, extra = divmod(n, tp)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def max_shard(n: int, tp: int) -> int:
    """The largest share of n units over tp ranks (ceil(n / tp))."""
    return -(-n // tp)


class HeadPartition(NamedTuple):
    """One rank's heads: query heads [q_start, q_start + q_count), KV heads [kv_start, kv_start + kv_count)."""
    q_start: int
    q_count: int
    kv_start: int
    kv_count: int


def check_heads(num_heads: int, num_kv_heads: int, tp: int) -> None:
    """Raise ValueError, saying why, when num_heads / num_kv_heads cannot be split over tp ranks."""
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads "
                         f"({num_kv_heads})")
    if tp < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {tp}")
    if tp > num_heads:
        raise ValueError(f"tensor-parallel size {tp} exceeds num_attention_heads ({num_heads}): every rank needs at "
                         f"least one query head; use a tensor-parallel size of at most {num_heads}")


def head_partition(num_heads: int, num_kv_heads: int, tp: int, rank: int) -> HeadPartition:
    """The query and KV heads tensor-parallel rank `rank` of `tp` holds (see the module docstring for the rule)."""
    check_heads(num_heads, num_kv_heads, tp)
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is outside a tensor-parallel group of {tp}")
    group = num_heads // num_kv_heads
    if tp <= num_kv_heads:
        kv_start, kv_count = shard_range(num_kv_heads, tp, rank)
        return HeadPartition(kv_start * group, kv_count * group, kv_start, kv_count)
    first = 0  # first rank of KV head g
    for g, ranks in enumerate(split_sizes(tp, num_kv_heads)):
        if rank < first + ranks:
            q_off, q_count = shard_range(group, ranks, rank - first)  # ranks <= group because tp <= num_heads
            return HeadPartition(g * group + q_off, q_count, g, 1)
        first += ranks
    raise AssertionError("unreachable: the ranks per KV head sum to tp")


def all_head_partitions(num_heads: int, num_kv_heads: int, tp: int) -> list[HeadPartition]:
    """Every rank's HeadPartition, in rank order."""
    return [head_partition(num_heads, num_kv_heads, tp, r) for r in range(tp)]


def max_heads_per_rank(num_heads: int, num_kv_heads: int, tp: int) -> tuple[int, int]:
    """(query heads, KV heads) of the most loaded rank: the largest shard that sets the pace and the memory."""
    parts = all_head_partitions(num_heads, num_kv_heads, tp)
    return max(p.q_count for p in parts), max(p.kv_count for p in parts)
