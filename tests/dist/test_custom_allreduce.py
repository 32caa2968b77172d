"""The custom all-reduce's kernel and protocol across real processes.

CPU (always): each rank's buffer is a POSIX shared-memory segment mapped by every rank, standing in for the CUDA
IPC mapping, and the Triton kernel runs through the interpreter (TRITON_INTERPRET=1, set by conftest). The ranks
then really race each other through the flag barrier and the two data sets over many generations, through the
GroupCoordinator as the model layers call it.

CUDA (where a GPU is): two ranks on one GPU map each other's buffer over CUDA IPC (`CustomAllReduce.create`,
gloo for the process group since NCCL refuses two ranks on one device), eager and inside a captured CUDA graph.
"""

from __future__ import annotations

import socket
from multiprocessing import shared_memory

import pytest
import torch
import torch.distributed as dist

from launcher import run_ranks
from shardserve.distributed.custom_allreduce import CustomAllReduce, RankInfo
from shardserve.distributed.message_queue import _attach_untracked
from shardserve.distributed.parallel_state import build_parallel_state
from shardserve.utils.network import unique_name

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiproc")]

MAX_BYTES = 2048
SIZES = [1, 7, 64, 65, 200, 512]  # elements; 512 fp32 = MAX_BYTES; 65 crosses the 4 x 16 tile grid
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class ShmIpc:
    """CudaIpc's stand-in on CPU ranks: a buffer is a POSIX shared-memory segment, its handle the segment's name.
    `fail_open_on` makes that rank fail to open peers' buffers (every rank must then fall back together)."""

    def __init__(self, fail_open_on: int | None = None):
        self.fail_open_on, self.rank = fail_open_on, None
        self.created: list = []

    def applies(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def local_info(self, device: torch.device) -> RankInfo:
        return RankInfo(socket.gethostname(), 0, [0], True)

    def alloc(self, nbytes: int, device: torch.device) -> torch.Tensor:
        seg = shared_memory.SharedMemory(create=True, size=nbytes, name=unique_name("car"))  # zero-filled
        self.created.append(seg)
        return torch.frombuffer(seg.buf, dtype=torch.uint8)

    def export(self, buf: torch.Tensor) -> list:
        return [self.created[-1].name]

    def open(self, handle: list, device: torch.device):
        if self.fail_open_on is not None and dist.get_rank() == self.fail_open_on:
            raise OSError("refused (test)")
        seg = _attach_untracked(handle[0])
        view = torch.frombuffer(seg.buf, dtype=torch.uint8)
        return (seg, view), view.data_ptr()

    def unlink(self) -> None:
        """After create: every rank has mapped the segments, so the names can go (nothing left in /dev/shm)."""
        for seg in self.created:
            seg.unlink()


def _shm_custom(group, max_bytes: int, programs: int) -> CustomAllReduce:
    ipc = ShmIpc()
    car = CustomAllReduce.create(group, max_bytes, ipc=ipc, programs=programs, block=16)
    ipc.unlink()
    assert car is not None and car.programs == programs and car.world == group.world_size
    return car


def _input(rank: int, n: int, dtype: torch.dtype, salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * rank + salt)
    return torch.randn(n, generator=g).to(dtype)


def _cpu_body(rank: int, world: int, programs: int) -> dict:
    group = build_parallel_state(tp_size=world).tp
    group.custom = _shm_custom(group, MAX_BYTES, programs)
    outs, impls, salt = [], [], 0
    for dtype in DTYPES:
        for n in SIZES:
            if n * torch.tensor([], dtype=dtype).element_size() > MAX_BYTES:
                continue
            salt += 1
            x = _input(rank, n, dtype, salt)
            out = group.all_reduce(x)
            impls.append(group.last_impl)
            outs.append([dtype, n, salt, out, out is x])
    # interleaved with the other paths: too big, integer, then custom again
    big = group.all_reduce(torch.ones(MAX_BYTES // 4 + 1))
    impls.append(group.last_impl)
    ints = group.all_reduce(torch.full((3,), rank + 1, dtype=torch.int64))
    impls.append(group.last_impl)
    again = group.all_reduce(torch.full((5,), float(rank)))
    impls.append(group.last_impl)
    return {"outs": outs, "impls": impls, "big": big, "ints": ints, "again": again, "calls": group.custom.calls}


@pytest.mark.parametrize("world, programs", [(2, 1), (3, 4)])
def test_custom_allreduce_over_shared_memory_matches_the_fixed_order_sum(world, programs):
    """One program (a peer may start staging the next call while we still read: the two data sets must keep them
    apart) and four (a tile grid, 3 ranks)."""
    results = run_ranks(_cpu_body, world, programs, timeout=240)
    n_custom = len(results[0]["outs"])
    for r, res in enumerate(results):
        assert res["impls"] == ["custom"] * n_custom + ["shm", "shm", "custom"], f"rank {r}"
        assert res["calls"] == 1 + n_custom + 1  # the start-up check, the loop, the last call
        assert torch.equal(res["big"], torch.full((MAX_BYTES // 4 + 1,), float(world)))
        assert torch.equal(res["ints"], torch.full((3,), world * (world + 1) // 2, dtype=torch.int64))
        assert torch.equal(res["again"], torch.full((5,), float(sum(range(world)))))
        for (dtype, n, salt, out, in_place), out0 in zip(res["outs"], results[0]["outs"]):
            parts = [_input(j, n, dtype, salt) for j in range(world)]
            acc = parts[0].float()
            for p in parts[1:]:
                acc = acc + p.float()
            want = acc.to(dtype)  # ranks in order, in fp32, rounded once
            assert in_place and out.dtype == dtype and out.shape == (n,)
            assert torch.equal(out, out0[3]), f"rank {r} differs from rank 0 ({dtype}, {n})"
            tol = 2.0 ** -7 if dtype == torch.bfloat16 else 0.0  # the interpreter truncates to bf16
            assert ((out.float() - want.float()).abs() <= tol * want.float().abs()).all(), f"{dtype} {n}"


class _WrongOnRank1(CustomAllReduce):
    """A kernel that gets rank 1's sums wrong: the start-up check must catch it on every rank."""

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        super().all_reduce(t)
        return t.mul_(0.5) if self.rank == 1 else t


def _fallback_body(rank: int, world: int) -> dict:
    group = build_parallel_state(tp_size=world).tp
    failed = CustomAllReduce.create(group, 256, ipc=(ipc := ShmIpc(fail_open_on=1)))
    ipc.unlink()
    disabled = CustomAllReduce.create(group, 256, enabled=False, ipc=ShmIpc())
    wrong = _WrongOnRank1.create(group, 256, ipc=(ipc := ShmIpc()), programs=2, block=16)
    ipc.unlink()
    x = group.all_reduce(torch.ones(4))  # the group still works, through shm
    return {"failed": failed is None, "disabled": disabled is None, "wrong": wrong is None, "x": x,
            "impl": group.last_impl}


def test_every_rank_falls_back_when_one_rank_cannot_map_a_buffer_or_sums_wrong():
    for res in run_ranks(_fallback_body, 2, timeout=120):
        assert res["failed"] and res["disabled"] and res["wrong"] and res["impl"] == "shm"
        assert torch.equal(res["x"], torch.full((4,), 2.0))


def _cuda_body(rank: int, world: int) -> dict:
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    group = build_parallel_state(tp_size=world, backend="gloo", device=device).tp  # init_custom_allreduce ran
    assert group.custom is not None, "custom all-reduce did not come up on one GPU"
    out = {}
    for dtype in DTYPES:
        x = _input(rank, 3000, dtype, 1).to(device)
        out[str(dtype)] = group.all_reduce(x).cpu()
        assert group.last_impl == "custom"
    # captured in a CUDA graph, replayed with new inputs
    static = torch.zeros(1000, device=device)
    group.all_reduce(static)  # warm-up (compiles the kernel) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        group.all_reduce(static)
    replays = []
    for step in range(3):
        static.copy_(torch.full((1000,), float(rank + 10 * step), device=device))
        graph.replay()
        replays.append(static.cpu())
    torch.cuda.synchronize()
    return {"out": out, "replays": replays}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_custom_allreduce_over_cuda_ipc_eager_and_in_a_graph():
    world = 2
    results = run_ranks(_cuda_body, world, timeout=240)
    for dtype in DTYPES:
        parts = [_input(j, 3000, dtype, 1) for j in range(world)]
        want = (parts[0].float() + parts[1].float()).to(dtype)
        for res in results:
            assert torch.equal(res["out"][str(dtype)], want), str(dtype)
    for res in results:
        for step, got in enumerate(res["replays"]):
            assert torch.equal(got, torch.full((1000,), float(1 + 20 * step)))
