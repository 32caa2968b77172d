"""Tests for the paged-KV block manager and its automatic prefix cache, incl. a randomized reference-model check."""

from __future__ import annotations

import hashlib
import random
import struct
from collections import Counter
from dataclasses import dataclass

import pytest

from shardserve.engine.block_manager import ROOT_BLOCK_HASH, BlockManager, hash_block_tokens

BS = 16


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def run_prefill(bm: BlockManager, seq_id: int, tokens: list[int]) -> int:
    """Schedule a whole prompt at once: prefix lookup, slots, then register the computed full blocks."""
    computed = bm.allocate_prefix(seq_id, tokens)
    assert bm.allocate_slots(seq_id, len(tokens))
    bm.cache_full_blocks(seq_id, tokens, len(tokens))
    return computed


def snapshot(bm: BlockManager) -> tuple:
    return (
        list(bm._free),
        list(bm._evictable),
        dict(bm._cached),
        list(bm._ref_counts),
        list(bm._block_hashes),
        {s: (list(v.table), list(v.hashes)) for s, v in bm._seqs.items()},
        bm.prefix_cache_queries,
        bm.prefix_cache_hits,
    )


def check_invariants(bm: BlockManager) -> None:
    """Structural invariants that hold after every public operation."""
    n = bm.num_total_blocks
    free = list(bm._free)
    evictable = list(bm._evictable)
    assert len(free) == len(set(free)), "duplicate block in the free list"
    assert not set(free) & set(evictable)
    held = Counter(b for s in bm._seqs.values() for b in s.table)
    for s in bm._seqs.values():
        assert len(s.table) == len(set(s.table)), "a block appears twice in one table"
        assert len(s.hashes) <= len(s.table)
    for b in range(n):
        assert bm._ref_counts[b] == held[b], f"block {b}: ref count {bm._ref_counts[b]} != holders {held[b]}"
        states = (b in free) + (b in bm._evictable) + (held[b] > 0)
        assert states == 1, f"block {b} is in {states} of free/evictable/in-use"
        if b in free:
            assert bm._block_hashes[b] is None
        if b in bm._evictable:
            assert bm._block_hashes[b] is not None
        if held[b] > 1:  # sharing only happens through the cache, hence only of full blocks
            assert bm._block_hashes[b] is not None
    for h, b in bm._cached.items():
        assert bm._block_hashes[b] == h
    assert sum(h is not None for h in bm._block_hashes) == len(bm._cached)
    assert bm.num_free_blocks == len(free) + len(evictable)
    assert bm.usage == pytest.approx(sum(1 for b in range(n) if held[b]) / n)
    if not bm.enable_prefix_caching:
        assert not bm._cached and not evictable


# ---------------------------------------------------------------------------------------------- hashing


def test_hash_chain_is_blake2b_of_parent_and_int64_tokens() -> None:
    tokens = [1, 2, 3, 2**40]
    expected = hashlib.blake2b(ROOT_BLOCK_HASH + struct.pack("<4q", *tokens), digest_size=16).digest()
    assert hash_block_tokens(ROOT_BLOCK_HASH, tokens) == expected
    h1 = hash_block_tokens(ROOT_BLOCK_HASH, [5, 6])
    assert hash_block_tokens(h1, [7, 8]) != hash_block_tokens(ROOT_BLOCK_HASH, [7, 8])  # depends on the parent
    assert len(h1) == 16


# ---------------------------------------------------------------------------------------------- basics


@pytest.mark.parametrize("caching", [True, False])
def test_allocate_and_free_restore_free_count(caching: bool) -> None:
    bm = BlockManager(10, BS, enable_prefix_caching=caching)
    assert bm.num_free_blocks == 10 and bm.usage == 0.0
    assert bm.allocate_prefix(1, toks(33)) == 0
    assert bm.block_table(1) == []
    assert bm.allocate_slots(1, 33)
    assert len(bm.block_table(1)) == 3  # ceil(33 / 16)
    assert bm.allocate_slots(1, 20)  # already covered: no-op
    assert len(bm.block_table(1)) == 3
    assert bm.num_free_blocks == 7 and bm.usage == pytest.approx(0.3)
    bm.cache_full_blocks(1, toks(33), 33)
    check_invariants(bm)
    bm.free(1)
    assert not bm.has_seq(1)
    assert bm.num_free_blocks == 10 and bm.usage == 0.0
    check_invariants(bm)


def test_api_errors_and_noops() -> None:
    bm = BlockManager(4, BS)
    bm.allocate_prefix(1, toks(5))
    with pytest.raises(ValueError):
        bm.allocate_prefix(1, toks(5))
    with pytest.raises(KeyError):
        bm.allocate_slots(99, 5)
    with pytest.raises(KeyError):
        bm.block_table(99)
    bm.free(99)  # unknown: no-op
    bm.cache_full_blocks(99, toks(32), 32)  # unknown: no-op
    assert bm.can_allocate(99, 64) and not bm.can_allocate(99, 65)  # unknown counts as an empty table
    assert bm.allocate_prefix(2, []) == 0
    with pytest.raises(ValueError):
        BlockManager(0, BS)
    check_invariants(bm)


# ---------------------------------------------------------------------------------------------- sharing


def test_two_seqs_share_cached_full_blocks() -> None:
    bm = BlockManager(10, BS)
    a = toks(40)
    b = toks(32) + toks(8, start=1000)
    assert run_prefill(bm, 1, a) == 0
    table_a = bm.block_table(1)
    assert bm.num_cached_blocks == 2  # the partial third block is not cached
    assert bm.allocate_prefix(2, b) == 32
    table_b = bm.block_table(2)
    assert table_b == table_a[:2]
    assert [bm.ref_count(x) for x in table_a] == [2, 2, 1]
    assert bm.allocate_slots(2, len(b))
    table_b = bm.block_table(2)
    assert table_b[2] != table_a[2]  # the partial last block is private
    assert bm.num_free_blocks == 10 - 4
    check_invariants(bm)
    bm.free(1)
    assert [bm.ref_count(x) for x in table_a] == [1, 1, 0]
    bm.free(2)
    assert bm.num_free_blocks == 10
    check_invariants(bm)


def test_partial_last_block_never_shared() -> None:
    bm = BlockManager(10, BS)
    p = toks(20)
    run_prefill(bm, 1, p)
    assert bm.num_cached_blocks == 1
    assert bm.allocate_prefix(2, p) == 16
    assert bm.block_table(2) == bm.block_table(1)[:1]
    assert bm.allocate_slots(2, 20)
    assert bm.block_table(2)[1] != bm.block_table(1)[1]
    assert bm.ref_count(bm.block_table(1)[1]) == 1
    check_invariants(bm)


def test_allocate_prefix_leaves_at_least_one_token() -> None:
    bm = BlockManager(10, BS)
    run_prefill(bm, 1, toks(48))  # caches 3 full blocks
    bm.free(1)
    assert bm.allocate_prefix(2, toks(32)) == 16  # 2 cached blocks match, but one token must be computed
    assert len(bm.block_table(2)) == 1
    assert bm.allocate_prefix(3, toks(33)) == 32
    assert bm.allocate_prefix(4, toks(16)) == 0
    assert bm.allocate_prefix(5, toks(1)) == 0
    assert bm.allocate_prefix(6, [7] + toks(40)[1:]) == 0  # first block differs: the chain breaks at once
    check_invariants(bm)


def test_divergent_block_breaks_the_chain() -> None:
    bm = BlockManager(10, BS)
    run_prefill(bm, 1, toks(49))
    other = toks(16) + [999] + toks(32)[17:] + toks(17, start=32)  # block 1 differs, block 2 equal to seq 1's
    assert bm.allocate_prefix(2, other) == 16  # hash chain: block 2 cannot match once block 1 differs


def test_identical_block_computed_twice_stays_private() -> None:
    bm = BlockManager(10, BS)
    p = toks(33)
    bm.allocate_prefix(1, p)
    bm.allocate_prefix(2, p)  # nothing cached yet: both compute the same blocks
    assert bm.allocate_slots(1, 33) and bm.allocate_slots(2, 33)
    bm.cache_full_blocks(1, p, 33)
    bm.cache_full_blocks(2, p, 33)
    bm.cache_full_blocks(2, p, 33)  # idempotent
    t1, t2 = bm.block_table(1), bm.block_table(2)
    assert set(bm._cached.values()) == set(t1[:2])  # the first registration wins
    check_invariants(bm)
    bm.free(2)  # seq 2's duplicates hold no hash: straight back to the free list
    assert list(bm._evictable) == [] and all(b in bm._free for b in t2)
    bm.free(1)
    assert bm.allocate_prefix(3, p) == 32 and bm.block_table(3) == t1[:2]
    check_invariants(bm)


def test_incremental_caching_during_decode() -> None:
    bm = BlockManager(10, BS)
    p = toks(10)
    bm.allocate_prefix(1, p)
    for n in range(10, 40):  # decode: one token at a time
        assert bm.allocate_slots(1, n)
        bm.cache_full_blocks(1, p, n)
        assert bm.num_cached_blocks == n // BS
        p = p + [n]
    check_invariants(bm)
    bm.free(1)
    assert bm.allocate_prefix(2, toks(40)) == 32


def test_prefix_caching_off_never_shares() -> None:
    bm = BlockManager(10, BS, enable_prefix_caching=False)
    run_prefill(bm, 1, toks(40))
    assert bm.allocate_prefix(2, toks(40)) == 0
    assert bm.allocate_slots(2, 40)
    assert not set(bm.block_table(1)) & set(bm.block_table(2))
    assert bm.num_cached_blocks == 0
    bm.free(1)
    bm.free(2)
    assert bm.allocate_prefix(3, toks(40)) == 0
    assert bm.prefix_cache_queries == 0 and bm.prefix_cache_hits == 0
    check_invariants(bm)


# ---------------------------------------------------------------------------------------------- eviction


def test_eviction_is_lru_and_only_of_ref0_blocks() -> None:
    bm = BlockManager(6, BS)
    a, b = toks(33), toks(33, start=100)
    run_prefill(bm, 1, a)  # blocks a0 a1 (cached) + a2 (partial)
    run_prefill(bm, 2, b)  # blocks b0 b1 (cached) + b2 (partial)
    ta, tb = bm.block_table(1), bm.block_table(2)
    bm.free(1)
    bm.free(2)
    # tail first within a seq, older seq first: a1 a0 b1 b0; the partial blocks went to the free list
    assert list(bm._evictable) == [ta[1], ta[0], tb[1], tb[0]]
    assert bm.num_free_blocks == 6

    # Hitting a0 takes it off the LRU (ref 0 -> 1): it must not be evicted while held.
    assert bm.allocate_prefix(3, a[:17]) == 16
    assert list(bm._evictable) == [ta[1], tb[1], tb[0]]
    assert bm.num_free_blocks == 5
    assert bm.allocate_slots(3, 17 + 3 * BS)  # 4 new blocks: 2 from the free list, then evict a1, b1
    t3 = bm.block_table(3)
    assert t3[0] == ta[0] and set(t3[1:3]) == {ta[2], tb[2]} and t3[3:] == [ta[1], tb[1]]
    assert list(bm._evictable) == [tb[0]]
    assert bm.num_cached_blocks == 2  # a0 (held) and b0 (evictable)
    assert bm.allocate_prefix(4, b) == 16  # b0 still cached, b1 was evicted
    assert not bm.allocate_slots(4, 33)  # nothing left: the held a0 is never evicted
    check_invariants(bm)

    # A block freed again goes to the most recently used end.
    bm.free(4)
    bm.free(3)
    assert list(bm._evictable)[-1] == ta[0]
    assert bm.num_free_blocks == 6
    check_invariants(bm)


def test_allocate_slots_failure_leaves_state_unchanged() -> None:
    bm = BlockManager(5, BS)
    run_prefill(bm, 1, toks(33))
    bm.free(1)
    bm.allocate_prefix(2, toks(33))
    bm.allocate_slots(2, 33)
    before = snapshot(bm)
    free_before = bm.num_free_blocks
    covered = len(bm.block_table(2)) * BS  # 48
    assert not bm.can_allocate(2, covered + free_before * BS + 1)  # one block short
    assert not bm.allocate_slots(2, covered + free_before * BS + 1)
    assert snapshot(bm) == before
    assert bm.can_allocate(2, covered + free_before * BS)
    assert bm.allocate_slots(2, covered + free_before * BS)
    assert bm.num_free_blocks == 0 and bm.usage == 1.0
    check_invariants(bm)


def test_reset_prefix_cache() -> None:
    bm = BlockManager(8, BS)
    run_prefill(bm, 1, toks(40))
    assert not bm.reset_prefix_cache()  # blocks in use
    assert bm.num_cached_blocks == 2
    bm.free(1)
    assert bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 8 and not bm._evictable
    assert bm.allocate_prefix(2, toks(40)) == 0
    check_invariants(bm)


def test_hit_counters() -> None:
    bm = BlockManager(8, BS)
    run_prefill(bm, 1, toks(40))
    bm.allocate_prefix(2, toks(40))
    assert bm.prefix_cache_queries == 80 and bm.prefix_cache_hits == 32


# ---------------------------------------------------------------------------------------------- stress


class RefModel:
    """A deliberately naive model of the block manager: prefixes keyed by token tuples, lists scanned linearly."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.bs = block_size
        self.caching = caching
        self.tables: dict[int, list[int]] = {}
        self.considered: dict[int, int] = {}  # full blocks already offered to the cache per seq
        self.cached: dict[tuple[int, ...], int] = {}  # whole token prefix -> block
        self.key_of: dict[int, tuple[int, ...]] = {}
        self.lru: list[int] = []  # evictable, oldest first
        self.free: set[int] = set(range(num_blocks))

    def num_free(self) -> int:
        return len(self.free) + len(self.lru)

    def holders(self, block: int) -> int:
        return sum(t.count(block) for t in self.tables.values())

    def allocate_prefix(self, seq: int, tokens: list[int]) -> int:
        table: list[int] = []
        if self.caching:
            for i in range(max(0, (len(tokens) - 1) // self.bs)):
                block = self.cached.get(tuple(tokens[: (i + 1) * self.bs]))
                if block is None:
                    break
                if block in self.lru:
                    self.lru.remove(block)
                table.append(block)
        self.tables[seq] = table
        self.considered[seq] = len(table)
        return len(table) * self.bs

    def allocate_slots(self, seq: int, n: int, actual_table: list[int], ok: bool) -> None:
        """Check the manager's outcome (ok, actual_table) against what the model allows, then adopt it."""
        table = self.tables[seq]
        need = -(-n // self.bs) - len(table)
        if need <= 0:
            assert ok and actual_table == table
            return
        if need > self.num_free():
            assert not ok and actual_table == table
            return
        assert ok and actual_table[: len(table)] == table
        new = actual_table[len(table) :]
        assert len(new) == need
        n_from_free = min(need, len(self.free))
        assert set(new[:n_from_free]) <= self.free and len(set(new[:n_from_free])) == n_from_free
        evicted = new[n_from_free:]
        assert evicted == self.lru[: len(evicted)], "eviction must follow LRU order"
        self.free -= set(new[:n_from_free])
        del self.lru[: len(evicted)]
        for block in evicted:
            del self.cached[self.key_of.pop(block)]
        table.extend(new)

    def cache_full_blocks(self, seq: int, tokens: list[int], computed: int) -> None:
        if seq not in self.tables or not self.caching:
            return
        table = self.tables[seq]
        num_full = min(min(computed, len(tokens)) // self.bs, len(table))
        for i in range(self.considered[seq], num_full):
            key = tuple(tokens[: (i + 1) * self.bs])
            if key not in self.cached and table[i] not in self.key_of:
                self.cached[key] = table[i]
                self.key_of[table[i]] = key
        self.considered[seq] = max(self.considered[seq], num_full)

    def free_seq(self, seq: int) -> None:
        table = self.tables.pop(seq, None)
        self.considered.pop(seq, None)
        for block in reversed(table or []):
            if self.holders(block) == 0:
                (self.lru.append if block in self.key_of else self.free.add)(block)

    def compare(self, bm: BlockManager) -> None:
        assert bm.num_free_blocks == self.num_free()
        assert {s: bm.block_table(s) for s in self.tables} == self.tables
        assert set(bm._seqs) == set(self.tables)
        assert list(bm._evictable) == self.lru
        assert set(bm._free) == self.free
        assert set(bm._cached.values()) == set(self.key_of)


@dataclass
class SimSeq:
    tokens: list[int]
    computed: int = 0


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_against_reference_model(seed: int, caching: bool) -> None:
    rng = random.Random(seed)
    bs, num_blocks = 4, 24
    bm = BlockManager(num_blocks, bs, enable_prefix_caching=caching)
    ref = RefModel(num_blocks, bs, caching)
    # A small vocabulary makes identical blocks under different prefixes (and duplicate computation) common.
    prefixes = [[rng.randrange(3) for _ in range(rng.randrange(0, 30))] for _ in range(5)]
    waiting: dict[int, list[int]] = {}  # new or preempted seqs, not holding blocks
    running: dict[int, SimSeq] = {}
    next_id = 0
    hits = 0

    for _ in range(2500):
        op = rng.random()
        if op < 0.15 and len(waiting) + len(running) < 10:
            waiting[next_id] = rng.choice(prefixes) + [rng.randrange(3) for _ in range(rng.randint(1, 16))]
            next_id += 1
        elif op < 0.35 and waiting:
            seq = rng.choice(list(waiting))
            tokens = waiting.pop(seq)
            computed = bm.allocate_prefix(seq, tokens)
            assert computed == ref.allocate_prefix(seq, tokens)
            assert computed % bs == 0 and computed <= max(0, (len(tokens) - 1) // bs * bs)
            hits += computed > 0
            running[seq] = SimSeq(tokens, computed)
        elif op < 0.85 and running:
            seq = rng.choice(list(running))
            s = running[seq]
            if s.computed == len(s.tokens):  # prefill done: the sampled token becomes the next input
                s.tokens.append(rng.randrange(3))
            target = s.computed + min(rng.randint(1, 12), len(s.tokens) - s.computed)
            if rng.random() < 0.1:
                target = rng.randint(0, target)  # ask for less than the table covers: a no-op
            can = bm.can_allocate(seq, target)
            ok = bm.allocate_slots(seq, target)
            assert can == ok
            ref.allocate_slots(seq, target, bm.block_table(seq), ok)
            if ok:
                s.computed = max(s.computed, target)
                for _ in range(rng.choice([1, 1, 2])):  # sometimes twice: idempotent
                    bm.cache_full_blocks(seq, s.tokens, s.computed)
                ref.cache_full_blocks(seq, s.tokens, s.computed)
            else:  # preempt (recompute): free everything, back to waiting with its tokens
                bm.free(seq)
                ref.free_seq(seq)
                waiting[seq] = running.pop(seq).tokens
        elif running or waiting:  # finish or abort
            seq = rng.choice(list(running) + list(waiting))
            running.pop(seq, None)
            waiting.pop(seq, None)
            bm.free(seq)
            ref.free_seq(seq)
        check_invariants(bm)
        ref.compare(bm)

    for seq in list(running):
        bm.free(seq)
        ref.free_seq(seq)
    check_invariants(bm)
    ref.compare(bm)
    assert bm.num_free_blocks == num_blocks and bm.usage == 0.0
    assert bm.reset_prefix_cache()
    assert len(bm._free) == num_blocks
    if caching:
        assert hits > 0, "the stress test should exercise prefix hits"
