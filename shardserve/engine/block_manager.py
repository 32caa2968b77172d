"""Paged KV-cache block manager: block tables, ref counts, free list and the automatic prefix cache."""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

BlockHash = bytes

_HASH_DIGEST_SIZE = 16
# Parent of the first block of every sequence. A fixed-length parent keeps parent || tokens unambiguous.
ROOT_BLOCK_HASH: BlockHash = b"\x00" * _HASH_DIGEST_SIZE


def hash_block_tokens(parent_hash: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """Chained content hash of one full block: blake2b(parent digest || token ids as little-endian int64).

    A cryptographic hash, so that a client cannot craft two prompts whose blocks collide (Python's hash() of a
    tuple is trivially attackable) and read another request's KV."""
    h = hashlib.blake2b(parent_hash, digest_size=_HASH_DIGEST_SIZE)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


@dataclass
class _SeqBlocks:
    """A sequence's block table and the hash chain of its leading full blocks (hashes[i] belongs to table[i])."""

    table: list[int] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)


class BlockManager:
    """Hands out fixed-size KV blocks to sequences and shares identical full prefix blocks between them.

    Every block is in exactly one of three states:
      * free: in ``_free`` (ref 0, no hash);
      * evictable: in ``_evictable`` (ref 0, hash registered in ``_cached``), ordered least recently used first;
      * in use: ref count > 0 (held by that many block tables); it may or may not hold a registered hash.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_total_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching

        self._ref_counts: list[int] = [0] * num_blocks
        self._block_hashes: list[BlockHash | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: dict[BlockHash, int] = {}  # hash -> physical block id
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref-0 cached blocks, LRU first
        self._seqs: dict[int, _SeqBlocks] = {}

        # Token counters for the prefix-cache hit-rate metric (only counted with prefix caching on).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ------------------------------------------------------------------ per sequence

    def allocate_prefix(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Start the seq's block table with the longest chain of cached full blocks matching token_ids.

        Returns the number of tokens whose KV is already computed: a multiple of block_size, and at most
        ((len - 1) // block_size) * block_size so that at least one token is left to compute."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already has a block table; free it before allocating again")
        seq = _SeqBlocks()
        self._seqs[seq_id] = seq
        if not self.enable_prefix_caching:
            return 0

        bs = self.block_size
        max_blocks = max(0, (len(token_ids) - 1) // bs)
        parent = ROOT_BLOCK_HASH
        for i in range(max_blocks):
            block_hash = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs])
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            if self._ref_counts[block_id] == 0:
                del self._evictable[block_id]
            self._ref_counts[block_id] += 1
            seq.table.append(block_id)
            seq.hashes.append(block_hash)
            parent = block_hash

        num_computed = len(seq.table) * bs
        self.prefix_cache_queries += len(token_ids)
        self.prefix_cache_hits += num_computed
        return num_computed

    def num_new_blocks(self, seq_id: int, num_total_tokens: int) -> int:
        """Blocks the seq's table must gain to cover num_total_tokens positions (an unknown seq has none)."""
        seq = self._seqs.get(seq_id)
        have = len(seq.table) if seq is not None else 0
        need = -(-num_total_tokens // self.block_size)  # ceil
        return max(0, need - have)

    def can_allocate(self, seq_id: int, num_total_tokens: int) -> bool:
        """Whether allocate_slots(seq_id, num_total_tokens) would succeed (an unknown seq counts as an empty table)."""
        return self.num_new_blocks(seq_id, num_total_tokens) <= self.num_free_blocks

    def allocate_slots(self, seq_id: int, num_total_tokens: int) -> bool:
        """Grow the seq's block table to cover num_total_tokens positions; False (and no change) if blocks run out."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise KeyError(f"sequence {seq_id} has no block table; call allocate_prefix first")
        num_new = self.num_new_blocks(seq_id, num_total_tokens)
        if num_new > self.num_free_blocks:
            return False
        for _ in range(num_new):
            block_id = self._take_block()
            self._ref_counts[block_id] = 1
            seq.table.append(block_id)
        return True

    def _take_block(self) -> int:
        """A ref-0 block with no hash: from the free list, else by evicting the least recently used cached block."""
        if self._free:
            return self._free.popleft()
        block_id, _ = self._evictable.popitem(last=False)
        block_hash = self._block_hashes[block_id]
        assert block_hash is not None and self._cached.get(block_hash) == block_id
        del self._cached[block_hash]
        self._block_hashes[block_id] = None
        return block_id

    def cache_full_blocks(self, seq_id: int, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register the hash of each block that became full (all its KV computed) since the last call.

        If an identical block is already cached in another physical block, the existing entry wins and this seq's
        block stays private. Idempotent; a no-op for an unknown seq (e.g. aborted while its step ran)."""
        seq = self._seqs.get(seq_id)
        if seq is None or not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(num_computed_tokens, len(token_ids)) // bs
        num_full = min(num_full, len(seq.table))
        parent = seq.hashes[-1] if seq.hashes else ROOT_BLOCK_HASH
        for i in range(len(seq.hashes), num_full):
            block_hash = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs])
            seq.hashes.append(block_hash)
            block_id = seq.table[i]
            if block_hash not in self._cached and self._block_hashes[block_id] is None:
                self._cached[block_hash] = block_id
                self._block_hashes[block_id] = block_hash
            parent = block_hash

    def free(self, seq_id: int) -> None:
        """Drop the seq's references, tail first so that tail blocks are the first to be evicted. Unknown seq: no-op."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        for block_id in reversed(seq.table):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] > 0:
                continue
            if self._block_hashes[block_id] is not None:
                self._evictable[block_id] = None  # most recently used end
            else:
                self._free.append(block_id)

    def block_table(self, seq_id: int) -> list[int]:
        """A copy of the seq's block table (physical block ids in position order)."""
        return list(self._seqs[seq_id].table)

    def has_seq(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    # ------------------------------------------------------------------ totals

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: the free list plus evictable (ref-0) cached blocks."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """KV-cache usage in [0, 1]: the fraction of blocks held by some sequence."""
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose hash is registered in the prefix cache (in use or evictable)."""
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash, returning those blocks to the free list; refused (False) while any block is used."""
        if self.num_free_blocks != self.num_total_blocks:
            return False
        for block_id in self._evictable:
            self._block_hashes[block_id] = None
            self._free.append(block_id)
        self._evictable.clear()
        self._cached.clear()
        return True
