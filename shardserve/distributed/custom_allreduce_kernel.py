"""The one-shot all-reduce kernel of `custom_allreduce.py` (its docstring gives the buffer layout and the protocol).
Imported only where the custom all-reduce runs, so ranks without triton never import it."""
from __future__ import annotations

import triton
import triton.language as tl

# Buffer layout, in bytes from a rank's buffer address (the same constants as custom_allreduce.py).
MAX_WORLD: tl.constexpr = tl.constexpr(8)
MAX_PROGRAMS: tl.constexpr = tl.constexpr(64)
FLAGS_OFF: tl.constexpr = tl.constexpr(0)  # int64 flags[MAX_PROGRAMS][MAX_WORLD]
COUNTERS_OFF: tl.constexpr = tl.constexpr(64 * 8 * 8)  # int64 counters[MAX_PROGRAMS]
DATA_OFF: tl.constexpr = tl.constexpr(64 * 8 * 8 + 64 * 8)  # two data sets of set_bytes each


@triton.jit
def one_shot_all_reduce(x, ptrs, n, rank, set_bytes, WORLD: tl.constexpr, PROGRAMS: tl.constexpr,
                        BLOCK: tl.constexpr):
    """x[:n] = sum over ranks r = 0..WORLD-1 of rank r's x, in place. ptrs: int64 [WORLD] buffer addresses."""
    pid = tl.program_id(0)
    elem = x.dtype.element_ty
    own = tl.load(ptrs + rank)
    counter = (own + COUNTERS_OFF + pid * 8).to(tl.pointer_type(tl.int64))
    gen = tl.load(counter) + 1  # only this program of this rank touches its counter
    set_off = DATA_OFF + (gen % 2) * set_bytes
    mine = tl.multiple_of((own + set_off).to(tl.pointer_type(elem)), 16)  # 256-byte aligned sets: vector accesses
    # 1. stage this program's tiles of the input in our own buffer
    start = pid * BLOCK
    while start < n:
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(mine + offs, tl.load(x + offs, mask=mask), mask=mask)
        start += PROGRAMS * BLOCK
    tl.debug_barrier()  # every thread's stores happen before the flag
    # 2. announce generation `gen` of program pid to every rank (ourselves included)
    for r in tl.static_range(WORLD):
        flag = (tl.load(ptrs + r) + FLAGS_OFF + (pid * MAX_WORLD + rank) * 8).to(tl.pointer_type(tl.int64))
        tl.atomic_xchg(flag, gen, sem="release", scope="sys")
    # 3. wait until program pid of every rank has staged its tiles
    for r in tl.static_range(WORLD):
        flag = (own + FLAGS_OFF + (pid * MAX_WORLD + r) * 8).to(tl.pointer_type(tl.int64))
        while tl.atomic_add(flag, 0, sem="acquire", scope="sys") < gen:
            pass
    tl.debug_barrier()
    # 4. sum the same tiles of every rank, in rank order, into x
    start = pid * BLOCK
    while start < n:
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):
            src = tl.multiple_of((tl.load(ptrs + r) + set_off).to(tl.pointer_type(elem)), 16)
            acc += tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(x + offs, acc.to(elem), mask=mask)
        start += PROGRAMS * BLOCK
    tl.store(counter, gen)
