"""Collectives and tensor-dict send/recv on 2 and 4 CPU ranks (gloo) against sums and concatenations.

One spawn per world size runs every check (spawning ranks dominates the run time); each test below
then asserts on its own part, so a failure still names the operation.
"""

from __future__ import annotations

import pytest
import torch

from launcher import run_ranks
from shardserve.distributed.parallel_state import build_parallel_state, wait_all

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiproc")]

DTYPES = (torch.float32, torch.bfloat16, torch.int64)


def _local(rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rank-dependent values in [8 * rank, 8 * rank + 6]: sums stay exact even in bfloat16."""
    n = 1
    for s in shape:
        n *= s
    return (torch.arange(n, dtype=torch.float32).reshape(shape) % 7 + 8 * rank).to(dtype)


def _eq(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{name}: got {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}"
    assert torch.equal(got, want), f"{name}: values differ\n got {got}\nwant {want}"


def _collectives(rank: int, world_size: int) -> list[str]:
    state = build_parallel_state(tp_size=world_size)
    g = state.tp
    assert g.ranks == list(range(world_size)) and g.rank_in_group == rank
    ranks = range(world_size)
    done = []

    for dtype in DTYPES:
        for shape in [(7,), (3, 5), (2, 3, 5)]:
            want = sum(_local(r, shape, torch.float32) for r in ranks).to(dtype)
            _eq(f"all_reduce {dtype} {shape}", g.all_reduce(_local(rank, shape, dtype)), want)
            for dim in range(-1, len(shape)):
                want = torch.cat([_local(r, shape, dtype) for r in ranks], dim=dim)
                _eq(f"all_gather {dtype} {shape} dim={dim}", g.all_gather(_local(rank, shape, dtype), dim), want)
    done.append("all_reduce, all_gather")

    # non-contiguous input
    x = _local(rank, (5, 6), torch.float32).t()  # [6, 5], stride (1, 6)
    _eq("all_reduce non-contiguous", g.all_reduce(x), sum(_local(r, (5, 6), torch.float32) for r in ranks).t())
    _eq("all_gather non-contiguous", g.all_gather(_local(rank, (5, 6), torch.float32).t(), 1),
        torch.cat([_local(r, (5, 6), torch.float32).t() for r in ranks], dim=1))

    # reduce_scatter on every dim, odd trailing sizes
    for dtype in DTYPES:
        for shape, dim in [((world_size * 3,), 0), ((world_size * 2, 5), 0), ((3, world_size * 3), 1),
                           ((3, 5, world_size), -1), ((2, world_size * 2, 3), 1)]:
            total = sum(_local(r, shape, torch.float32) for r in ranks).to(dtype)
            want = total.chunk(world_size, dim=dim)[rank]
            _eq(f"reduce_scatter {dtype} {shape} dim={dim}", g.reduce_scatter(_local(rank, shape, dtype), dim), want)
    try:
        g.reduce_scatter(torch.ones(world_size + 1), 0)
        raise AssertionError("reduce_scatter accepted a size not divisible by the group")
    except ValueError:
        pass
    done.append("reduce_scatter")

    # broadcast from the last rank (non-zero src), incl. bf16 and a non-contiguous destination
    src = world_size - 1
    for dtype in DTYPES:
        t = _local(rank, (4, 3), dtype)
        out = g.broadcast(t, src=src)
        assert out is t
        _eq(f"broadcast {dtype}", t, _local(src, (4, 3), dtype))
    store = _local(src, (4, 3), torch.float32).t().contiguous() if rank == src else torch.zeros(3, 4)
    view = store.t()  # [4, 3], non-contiguous on every rank
    g.broadcast(view, src=src)
    _eq("broadcast into non-contiguous", view, _local(src, (4, 3), torch.float32))
    done.append("broadcast")

    # broadcast_object: nested dicts with tensors, from rank 1
    obj = {"step": 3, "seqs": [{"id": 7, "tokens": [1, 2, 3], "meta": {"s": "x", "n": None}}],
           "t": torch.arange(4, dtype=torch.bfloat16), 5: [1.5, True]}
    got = g.broadcast_object(obj if rank == 1 else None, src=1)
    assert {k: v for k, v in got.items() if k != "t"} == {k: v for k, v in obj.items() if k != "t"}
    _eq("broadcast_object tensor", got["t"], obj["t"])
    big = g.broadcast_object({"blob": "z" * 200_000} if rank == 0 else None, src=0)
    assert big == {"blob": "z" * 200_000}
    done.append("broadcast_object")

    g.barrier()
    state.world.barrier()
    done.append("barrier")
    return done


def _message(sender: int, tag: str) -> dict:
    g = torch.Generator().manual_seed(sender)
    return {
        "hidden": torch.randn(3, 5, generator=g).to(torch.bfloat16),  # [tokens, hidden]
        "residual": torch.randn(3, 5, generator=g),
        "half": torch.randn(2, 2, generator=g).half(),
        "positions": torch.arange(3, dtype=torch.int64) + sender,
        "slot_mapping": torch.tensor([4, 9, -1], dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(6, dtype=torch.uint8).reshape(2, 3),
        "scalar": torch.tensor(1.5 * sender),  # 0-d
        "empty": torch.empty(0, 5, dtype=torch.bfloat16),
        "strided": torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous
        "step": 41 + sender,
        "tag": tag,
        "nothing": None,
        "seq_ids": [1, 2, 3],
        "nested": {"a": [1, "b", None], "c": {"d": 2.5}},
    }


def _check(got: dict, want: dict, what: str) -> None:
    assert list(got) == list(want), f"{what}: keys {list(got)} != {list(want)}"
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            g = got[k]
            assert isinstance(g, torch.Tensor) and g.dtype == v.dtype and g.shape == v.shape, \
                f"{what}[{k}]: {type(g)} {getattr(g, 'dtype', None)} {getattr(g, 'shape', None)}"
            assert torch.equal(g, v), f"{what}[{k}]: {g} != {v}"
        else:
            assert got[k] == v, f"{what}[{k}]: {got[k]!r} != {v!r}"


def _p2p(rank: int, world_size: int) -> list[str]:
    """Tensor dicts along a pp group spanning every rank."""
    state = build_parallel_state(tp_size=1, pp_size=world_size)
    pp = state.pp
    assert pp.rank_in_group == rank
    checks = []

    # blocking send/recv between ranks 0 and 1, both directions
    if rank == 0:
        pp.send_tensor_dict(_message(0, "blocking"), dst=1)
        _check(pp.recv_tensor_dict(src=1), _message(1, "reply"), "0<-1")
    elif rank == 1:
        _check(pp.recv_tensor_dict(src=0), _message(0, "blocking"), "1<-0")
        pp.send_tensor_dict(_message(1, "reply"), dst=0)
    checks.append("send/recv")

    # non-blocking ring: everyone isends to next and receives from prev at the same time
    handles = pp.isend_tensor_dict(_message(rank, f"ring{rank}"), dst=pp.next_rank)
    _check(pp.recv_tensor_dict(src=pp.prev_rank), _message(pp.prev_rank, f"ring{pp.prev_rank}"), "ring")
    wait_all(handles)
    assert all(h.is_completed() for h in handles)
    checks.append("isend ring")

    # several messages in flight to the same peer keep their order
    if rank == 0:
        handles = [h for i in range(3) for h in pp.isend_tensor_dict({"i": i, "t": torch.full((i + 1,), i)}, dst=1)]
        wait_all(handles)
    elif rank == 1:
        for i in range(3):
            _check(pp.recv_tensor_dict(src=0), {"i": i, "t": torch.full((i + 1,), i)}, f"in-order {i}")
    checks.append("isend order")

    # plain tensor send/recv into a preallocated buffer
    if rank == 0:
        pp.send(torch.arange(6, dtype=torch.bfloat16).reshape(2, 3).t(), dst=pp.next_rank)
    elif rank == 1:
        buf = pp.recv(torch.empty(3, 2, dtype=torch.bfloat16), src=0)
        assert torch.equal(buf, torch.arange(6, dtype=torch.bfloat16).reshape(2, 3).t())
    for bad in (rank, world_size):
        try:
            pp.send_tensor_dict({}, dst=bad)
            raise AssertionError(f"send_tensor_dict to {bad} was accepted")
        except ValueError:
            pass
    checks.append("send/recv tensor")
    pp.barrier()
    return checks


def _all_checks(rank: int, world_size: int) -> dict:
    return {"rank": rank, "collectives": _collectives(rank, world_size), "p2p": _p2p(rank, world_size),
            "echo": torch.full((2,), rank, dtype=torch.bfloat16)}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def results(request) -> list[dict]:
    return run_ranks(_all_checks, request.param, timeout=90)


def _passed(results: list[dict], part: str, check: str) -> None:
    for r in results:
        assert check in r[part], f"rank {r['rank']} did not complete {check!r}: {r[part]}"


def test_ranks_return_in_order(results):
    assert [r["rank"] for r in results] == list(range(len(results)))
    for r in results:  # a bf16 tensor came back through the launcher's msgpack channel
        assert torch.equal(r["echo"], torch.full((2,), r["rank"], dtype=torch.bfloat16))


@pytest.mark.parametrize("check", ["all_reduce, all_gather", "reduce_scatter", "broadcast",
                                   "broadcast_object", "barrier"])
def test_collective(results, check):
    _passed(results, "collectives", check)


@pytest.mark.parametrize("check", ["send/recv", "isend ring", "isend order", "send/recv tensor"])
def test_tensor_dict_p2p(results, check):
    _passed(results, "p2p", check)
