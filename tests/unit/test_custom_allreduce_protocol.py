"""The GPU custom all-reduce without processes: when a group may use it (unavailable_reason), what it takes
(applies), and the kernel's buffer protocol against a simulated peer, run on CPU through the Triton interpreter."""

from __future__ import annotations

import pytest
import torch

from shardserve.distributed import custom_allreduce as car
from shardserve.distributed.custom_allreduce import CustomAllReduce, RankInfo, buffer_bytes, unavailable_reason

kernel_mod = pytest.importorskip("shardserve.distributed.custom_allreduce_kernel")

SET_ALIGN = 256


def _info(host="h", device=0, peers=(0, 1), triton=True) -> RankInfo:
    return RankInfo(host, device, list(peers), triton)


def test_layout_constants_agree_with_the_kernel():
    assert kernel_mod.MAX_WORLD.value == car.MAX_WORLD
    assert kernel_mod.MAX_PROGRAMS.value == car.MAX_PROGRAMS
    assert kernel_mod.DATA_OFF.value == car._DATA_OFF
    assert kernel_mod.COUNTERS_OFF.value == car.MAX_PROGRAMS * car.MAX_WORLD * 8
    assert car._DATA_OFF % SET_ALIGN == 0
    assert buffer_bytes(1000) == car._DATA_OFF + 2 * 1024


@pytest.mark.parametrize("infos, enabled, want", [
    ([_info(device=0), _info(device=1)], True, None),
    ([_info(device=0), _info(device=0, peers=(0,))], True, None),  # two ranks on one GPU (tests)
    ([_info(device=0), _info(device=1)], False, "disabled"),
    ([_info()], True, "one rank"),
    ([_info(device=i, peers=range(9)) for i in range(9)], True, "up to 8"),
    ([_info(host="a", device=0), _info(host="b", device=1)], True, "spans hosts"),
    ([_info(device=0), _info(device=1, triton=False)], True, "triton"),
    ([_info(device=0, peers=(0,)), _info(device=1)], True, "cuda:0 has no NVLink peer access (with native atomics) to cuda:1"),
])
def test_unavailable_reason(infos, enabled, want):
    got = unavailable_reason(infos, enabled)
    assert (got is None) if want is None else (want in got)


def _equal(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit-equal, except bf16 on CPU: the Triton interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to
    nearest even, and the CUDA test in tests/dist/test_custom_allreduce.py asserts bit equality there), so a bf16
    sum may land one ulp below."""
    if got.dtype != torch.bfloat16 or got.is_cuda:
        return torch.equal(got, want)
    ulp = 2.0 ** (torch.floor(torch.log2(want.float().abs().clamp_min(1e-30))) - 7)
    return bool(((got.float() - want.float()).abs() <= ulp).all())


def _pair(max_bytes: int, programs: int = 3, block: int = 16):
    """Two zeroed buffers and a CustomAllReduce as rank 0 of 2; rank 1 is simulated by writing its buffer."""
    bufs = [torch.zeros(buffer_bytes(max_bytes), dtype=torch.uint8) for _ in range(2)]
    ar = CustomAllReduce([b.data_ptr() for b in bufs], 0, torch.device("cpu"), max_bytes, keep=bufs,
                         programs=programs, block=block)
    return ar, bufs


def _words(buf: torch.Tensor, off: int, n: int) -> torch.Tensor:
    return buf[off: off + 8 * n].view(torch.int64)


def _peer_arrives(ar: CustomAllReduce, bufs, gen: int, data: torch.Tensor) -> None:
    """What rank 1 does for generation `gen` before rank 0's kernel may pass its barrier: stage its data in set
    gen % 2 of its own buffer, and set flags[p][1] = gen in rank 0's buffer for every program p."""
    raw = data.reshape(-1).view(torch.uint8)
    off = car._DATA_OFF + (gen % 2) * ar.set_bytes
    bufs[1][off: off + raw.numel()] = raw
    flags = _words(bufs[0], 0, car.MAX_PROGRAMS * car.MAX_WORLD).view(car.MAX_PROGRAMS, car.MAX_WORLD)
    flags[: ar.programs, 1] = gen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_sums_a_simulated_peer_and_follows_the_buffer_protocol(dtype):
    ar, bufs = _pair(max_bytes=4096)
    g = torch.Generator().manual_seed(0)
    for gen, n in enumerate([1, 47, 48, 100, 4096 // torch.tensor([], dtype=dtype).element_size()], start=1):
        x = torch.randn(n, generator=g).to(dtype)
        peer = torch.randn(n, generator=g).to(dtype)
        want = (x.float() + peer.float()).to(dtype)  # rank 0 + rank 1, rounded once
        x_in = x.clone()
        _peer_arrives(ar, bufs, gen, peer)
        out = ar.all_reduce(x)
        assert out is x and _equal(x, want), f"generation {gen}, {n} elements"
        # rank 0 announced `gen` to rank 1 (flags[p][0] in rank 1's buffer) and staged its input in set gen % 2
        flags1 = _words(bufs[1], 0, car.MAX_PROGRAMS * car.MAX_WORLD).view(car.MAX_PROGRAMS, car.MAX_WORLD)
        assert flags1[: ar.programs, 0].tolist() == [gen] * ar.programs
        assert flags1[ar.programs:].abs().sum() == 0  # programs beyond the grid never write
        counters = _words(bufs[0], car.MAX_PROGRAMS * car.MAX_WORLD * 8, car.MAX_PROGRAMS)
        assert counters[: ar.programs].tolist() == [gen] * ar.programs
        off = car._DATA_OFF + (gen % 2) * ar.set_bytes
        staged = bufs[0][off: off + n * x.element_size()].view(dtype)
        assert torch.equal(staged, x_in)


def test_a_peer_one_generation_ahead_does_not_overwrite_what_we_read():
    """A peer may finish generation g and stage g + 1 before we read g: its flag is then g + 1 (flags only grow, so
    the barrier accepts it) and its g + 1 data sits in the other set, leaving the data of g intact."""
    ar, bufs = _pair(max_bytes=256)
    _peer_arrives(ar, bufs, 1, torch.ones(8))
    _peer_arrives(ar, bufs, 2, torch.full((8,), 100.0))
    x = torch.full((8,), 2.0)
    assert torch.equal(ar.all_reduce(x), torch.full((8,), 3.0))  # generation 1: 2 + 1
    y = torch.full((8,), 5.0)
    assert torch.equal(ar.all_reduce(y), torch.full((8,), 105.0))  # generation 2


def test_applies_and_bad_input():
    ar, _ = _pair(max_bytes=64)
    assert ar.applies(torch.zeros(16))  # 64 bytes
    assert not ar.applies(torch.zeros(17))  # over max_bytes
    assert not ar.applies(torch.zeros(0))
    assert not ar.applies(torch.zeros(4, dtype=torch.int64))
    assert not ar.applies(torch.zeros(4, 4)[:, 0])  # not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        ar.all_reduce(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="2..8 ranks"):
        CustomAllReduce([0], 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="power of two"):
        CustomAllReduce([0, 0], 0, torch.device("cpu"), block=100)
