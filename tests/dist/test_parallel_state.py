"""The process mesh: group membership matches rank = dp*(pp*tp) + pp*tp + tp on 4 ranks; world-1 state is identity."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from launcher import run_ranks
from shardserve.distributed.parallel_state import (
    GroupCoordinator, build_parallel_state, mesh_groups, single_process_state)

LAYOUTS = [(2, 2, 1), (2, 1, 2), (1, 4, 1), (1, 2, 2), (4, 1, 1)]  # (tp, pp, dp) on 4 ranks


def _expected(rank: int, tp: int, pp: int, dp: int) -> dict[str, list[int]]:
    """Group members of `rank`, straight from the formula (independent of mesh_groups)."""
    d, rest = divmod(rank, pp * tp)
    p, t = divmod(rest, tp)
    at = lambda d_, p_, t_: d_ * (pp * tp) + p_ * tp + t_  # noqa: E731
    return {
        "world": list(range(tp * pp * dp)),
        "tp": [at(d, p, i) for i in range(tp)],
        "pp": [at(d, i, t) for i in range(pp)],
        "dp": [at(i, p, t) for i in range(dp)],
        "ep": [at(i, p, j) for i in range(dp) for j in range(tp)],
        "coords": [d, p, t],
    }


def _check_group(g: GroupCoordinator, ranks: list[int], rank: int) -> None:
    where = f"rank {rank} group {g.name}"
    assert g.ranks == ranks, f"{where}: {g.ranks} != {ranks}"
    assert g.rank == rank and g.world_size == len(ranks), where
    i = ranks.index(rank)
    assert g.rank_in_group == i, where
    assert g.is_first_rank == (i == 0) and g.is_last_rank == (i == len(ranks) - 1), where
    assert g.next_rank == (i + 1) % len(ranks) and g.prev_rank == (i - 1) % len(ranks), where
    # the group really connects exactly these ranks
    total = g.all_reduce(torch.tensor([float(rank)]))
    assert total.item() == float(sum(ranks)), f"{where}: all_reduce {total.item()} != {sum(ranks)}"
    gathered = g.all_gather(torch.tensor([rank]), dim=0)
    assert gathered.tolist() == ranks, f"{where}: all_gather {gathered.tolist()}"


def _mesh(rank: int, world_size: int) -> list[dict]:
    try:
        build_parallel_state(tp_size=3)
        raise AssertionError("tp=3 accepted on 4 ranks")
    except ValueError as e:
        assert "4 ranks" in str(e)
    report = []
    for tp, pp, dp in LAYOUTS:
        state = build_parallel_state(tp_size=tp, pp_size=pp, dp_size=dp)
        want = _expected(rank, tp, pp, dp)
        for name in ("world", "tp", "pp", "dp", "ep"):
            _check_group(getattr(state, name), want[name], rank)
        assert [state.dp_rank, state.pp_rank, state.tp_rank] == want["coords"]
        assert (state.tp_size, state.pp_size, state.dp_size, state.world_size, state.rank) == (tp, pp, dp, 4, rank)
        # pipeline hand-off along the pp group, stage by stage
        if pp > 1:
            if not state.pp.is_first_rank:
                got = state.pp.recv_tensor_dict(src=state.pp.prev_rank)
                assert got["from"] == state.pp.ranks[state.pp.prev_rank]
                assert torch.equal(got["hidden"], torch.full((2, 3), float(got["from"])))
            if not state.pp.is_last_rank:
                state.pp.send_tensor_dict({"from": rank, "hidden": torch.full((2, 3), float(rank))},
                                          dst=state.pp.next_rank)
        state.world.barrier()
        report.append({n: getattr(state, n).ranks for n in ("tp", "pp", "dp", "ep")})
    return report


@pytest.mark.slow
@pytest.mark.xdist_group("multiproc")
def test_mesh_membership_on_4_ranks():
    reports = run_ranks(_mesh, 4, timeout=90)
    for rank, per_layout in enumerate(reports):
        for (tp, pp, dp), groups in zip(LAYOUTS, per_layout):
            want = _expected(rank, tp, pp, dp)
            assert groups == {n: want[n] for n in ("tp", "pp", "dp", "ep")}, (rank, tp, pp, dp)


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 1), (2, 2, 1), (2, 1, 3), (3, 2, 2), (1, 4, 2), (8, 2, 2)])
def test_mesh_groups_formula(tp, pp, dp):
    groups = mesh_groups(tp, pp, dp)
    world = tp * pp * dp
    for name, size in [("tp", tp), ("pp", pp), ("dp", dp), ("ep", tp * dp), ("world", world)]:
        lists = groups[name]
        assert all(len(ranks) == size for ranks in lists), name
        assert sorted(itertools.chain(*lists)) == list(range(world)), f"{name} is not a partition"
    for rank in range(world):
        want = _expected(rank, tp, pp, dp)
        for name in ("world", "tp", "pp", "dp", "ep"):
            assert [r for r in groups[name] if rank in r] == [want[name]], (name, rank)
    if tp > 1:
        assert groups["tp"][0] == list(range(tp))  # TP innermost: neighbours


def test_single_process_state_is_identity_without_torch_distributed():
    state = single_process_state()
    assert not dist.is_initialized()
    assert (state.rank, state.world_size, state.tp_size, state.pp_size, state.dp_size) == (0, 1, 1, 1, 1)
    assert (state.tp_rank, state.pp_rank, state.dp_rank, state.ep_size) == (0, 0, 0, 1)
    g = state.tp
    x = torch.arange(6.0).reshape(2, 3)
    assert g.all_reduce(x) is x and g.all_gather(x, 0) is x and g.broadcast(x) is x
    assert g.reduce_scatter(x, 1) is x
    obj = {"a": [1, None]}
    assert g.broadcast_object(obj) is obj
    g.barrier()
    assert g.is_first_rank and g.is_last_rank and g.next_rank == g.prev_rank == 0
    with pytest.raises(ValueError):
        g.send_tensor_dict({"x": x}, dst=0)
    assert not dist.is_initialized()


def test_build_requires_init_and_a_matching_world():
    assert not dist.is_initialized(), "this test needs a process with no process group"
    with pytest.raises(RuntimeError, match="init_distributed"):
        build_parallel_state(tp_size=1)


def _cpu_tensors_on_a_device_only_group(rank: int, world: int) -> dict:
    """The default group serves only CUDA tensors ("cuda:gloo": how an NCCL group looks to a CPU tensor); a
    GroupCoordinator must send CPU tensors over its gloo cpu_group instead (the worker all-gathers CPU ints over
    the world group at start-up, and --disable-custom-all-reduce turns the shared-memory path off)."""
    cpu_pg = dist.new_group(list(range(world)), backend="gloo")
    g = GroupCoordinator("world", list(range(world)), rank, dist.group.WORLD, cpu_pg, allreduce="gloo")
    try:
        dist.all_reduce(torch.ones(1), group=dist.group.WORLD)
        raw_ok = True
    except RuntimeError:
        raw_ok = False  # the premise: this group cannot carry a CPU tensor
    x = torch.full((3,), float(rank + 1))
    out = {"raw_ok": raw_ok, "sum": g.all_reduce(x.clone()), "gather": g.all_gather(x, 0),
           "rs": g.reduce_scatter(torch.arange(4.0), 0), "bcast": g.broadcast(x.clone(), 1),
           "objs": g.all_gather_object({"rank": rank, "b": b"\x00" * rank})}
    y = x.clone()
    g.all_reduce_async(y).wait()
    out["async"] = y
    return out


def test_cpu_tensors_take_the_cpu_group_when_the_device_group_cannot_carry_them():
    results = run_ranks(_cpu_tensors_on_a_device_only_group, 2, backend="cuda:gloo", timeout=60)
    for rank, r in enumerate(results):
        assert not r["raw_ok"]
        assert torch.equal(r["sum"], torch.full((3,), 3.0)) and torch.equal(r["async"], torch.full((3,), 3.0))
        assert torch.equal(r["gather"], torch.tensor([1.0, 1, 1, 2, 2, 2]))
        assert torch.equal(r["rs"], torch.arange(4.0)[2 * rank:2 * rank + 2] * 2)
        assert torch.equal(r["bcast"], torch.full((3,), 2.0))
        assert r["objs"] == [{"rank": 0, "b": b""}, {"rank": 1, "b": b"\x00"}]


def _warm_up(rank: int, world: int) -> bool:
    state = build_parallel_state(tp_size=2, pp_size=world // 2)
    state.tp.warm_up()
    state.pp.warm_up(p2p=True)
    return True


def test_warm_up_runs_on_every_group_without_deadlock():
    assert run_ranks(_warm_up, 4, timeout=60) == [True] * 4
