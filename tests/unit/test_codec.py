"""Round-trip tests for the msgpack codec: tensors of every dtype and layout, nesting, registered classes."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
import torch

from shardserve.distributed import codec

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool,
          torch.uint8, torch.float64, torch.int8, torch.int16]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert isinstance(b, torch.Tensor)
    assert b.dtype == a.dtype and b.shape == a.shape and b.device.type == "cpu"
    # bitwise equality: compare raw bytes so NaNs / -0.0 / bf16 rounding cannot hide a difference
    assert torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                       b.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (5, 7), (2, 3, 4)], ids=str)
def test_tensor_round_trip(dtype, shape):
    t = _sample(dtype, shape)
    _same(t, codec.decode(codec.encode(t)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_and_offset_views(dtype):
    base = _sample(dtype, (6, 8))
    views = {
        "transpose": base.t(),
        "step": base[:, ::3],
        "offset_contiguous": base[2:4],  # contiguous, but starts inside a larger storage
        "offset_scalar": base[3, 5],
        "expanded": base[:1].expand(4, 8),  # stride 0
    }
    for name, v in views.items():
        out = codec.decode(codec.encode(v))
        _same(v, out)
        assert out.is_contiguous(), name


def test_decoded_tensor_is_writable_and_owned():
    t = torch.arange(6, dtype=torch.float32)
    out = codec.decode(codec.encode(t))
    out += 1  # must not warn or fail (private writable buffer)
    assert torch.equal(out, torch.arange(1, 7, dtype=torch.float32))
    assert torch.equal(t, torch.arange(6, dtype=torch.float32))


def test_special_float_values_and_grad():
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40], requires_grad=True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = t.detach().to(dtype)
        _same(x, codec.decode(codec.encode(x)))
    out = codec.decode(codec.encode(t * 2))
    assert not out.requires_grad


def test_nested_structures():
    msg = {
        "step": 7,
        "neg": -(2**63),
        "big": 2**64 - 1,
        "ratio": 0.25,
        "name": "prefill",
        "blob": b"\x00\xff",
        "none": None,
        "flags": [True, False],
        "tuple": (1, (2, 3)),
        3: "int key",
        "seqs": [{"id": i, "tokens": list(range(i)), "t": torch.full((i,), i)} for i in range(3)],
        "dtype": torch.bfloat16,
        "size": torch.Size([2, 3]),
        "deep": {"a": {"b": {"c": [torch.ones(2, 2, dtype=torch.bfloat16), {"d": None}]}}},
    }
    out = codec.decode(codec.encode(msg))
    assert out["step"] == 7 and out["neg"] == -(2**63) and out["big"] == 2**64 - 1
    assert out["ratio"] == 0.25 and out["name"] == "prefill" and out["blob"] == b"\x00\xff"
    assert out["none"] is None and out["flags"] == [True, False]
    assert out["tuple"] == [1, [2, 3]]  # tuples come back as lists
    assert out[3] == "int key"
    for i, s in enumerate(out["seqs"]):
        assert s["id"] == i and s["tokens"] == list(range(i))
        _same(torch.full((i,), i), s["t"])
    assert out["dtype"] is torch.bfloat16
    assert out["size"] == [2, 3]
    _same(torch.ones(2, 2, dtype=torch.bfloat16), out["deep"]["a"]["b"]["c"][0])
    assert out["deep"]["a"]["b"]["c"][1] == {"d": None}


@codec.register
@dataclasses.dataclass
class _Step:
    step_id: int
    seq_ids: list[int]
    positions: torch.Tensor
    note: str | None = None
    cached: int = dataclasses.field(default=0, init=False)


@codec.register(name="test.Custom")
class _Custom:
    def __init__(self, x: int):
        self.x = x

    def to_dict(self) -> dict:
        return {"x": self.x}

    @classmethod
    def from_dict(cls, d: dict) -> "_Custom":
        return cls(d["x"] * 10)


class _PlainToDict:
    def to_dict(self) -> dict:
        return {"k": [1, 2]}


def test_registered_dataclass_round_trips_typed():
    s = _Step(3, [1, 2], torch.arange(4), note="hi")
    out = codec.decode(codec.encode({"steps": [s, s]}))
    assert isinstance(out["steps"][0], _Step)
    assert out["steps"][1].seq_ids == [1, 2] and out["steps"][1].note == "hi"
    _same(s.positions, out["steps"][0].positions)
    assert codec.decode(codec.encode(_Custom(4))).x == 40


def test_unregistered_to_dict_becomes_plain_dict():
    assert codec.decode(codec.encode([_PlainToDict()])) == [{"k": [1, 2]}]


def test_refuses_arbitrary_objects():
    class Opaque:
        pass

    with pytest.raises(TypeError, match="cannot encode"):
        codec.encode({"x": Opaque()})
    with pytest.raises(TypeError):
        codec.encode(torch.ones(2).to_sparse())
    with pytest.raises(TypeError):
        codec.register(Opaque)


def test_decode_rejects_unknown_and_malformed_input():
    with pytest.raises(ValueError, match="ext type"):
        codec.decode(msgpack.packb(msgpack.ExtType(42, b"x")))
    body = msgpack.packb(["nobody.Registered", {}])
    with pytest.raises(ValueError, match="not registered"):
        codec.decode(msgpack.packb(msgpack.ExtType(codec.EXT_OBJECT, body)))
    header = msgpack.packb(["float32", [4]])
    bad = len(header).to_bytes(4, "little") + header + b"\x00" * 15  # 16 bytes needed
    with pytest.raises(ValueError, match="bytes"):
        codec.decode(msgpack.packb(msgpack.ExtType(codec.EXT_TENSOR, bad)))
    header = msgpack.packb(["object", [1]])
    evil = len(header).to_bytes(4, "little") + header + b"\x00" * 8
    with pytest.raises(ValueError, match="dtype"):
        codec.decode(msgpack.packb(msgpack.ExtType(codec.EXT_TENSOR, evil)))


def test_large_tensor_bytes_exact():
    t = torch.randn(1 << 18)  # 1 MiB
    data = codec.encode(t)
    assert len(data) < t.numel() * 4 + 64
    _same(t, codec.decode(data))


def test_frame_decoder_reassembles_split_frames():
    """A byte stream of framed messages, cut anywhere (here: every byte, and arbitrary chunks), decodes to the
    same messages, registered classes and tensors included; several messages in one chunk all come out."""
    from shardserve.sampling_params import SamplingParams  # registered as "SamplingParams"

    msgs = [{"t": "add", "id": "r1", "prompt_token_ids": [1, 2, 3], "params": SamplingParams(n=2, seed=7)},
            _Step(1, [4], torch.arange(3), note="x"), {"t": "stats", 3: 1.5}, [], "done"]
    data = b"".join(codec.encode_frame(m) for m in msgs)
    for chunk in (1, 7, len(data)):
        dec = codec.FrameDecoder()
        got = []
        for k in range(0, len(data), chunk):
            dec.feed(data[k:k + chunk])
            got.extend(dec)
        assert len(got) == len(msgs), chunk
        assert isinstance(got[0]["params"], SamplingParams) and got[0]["params"] == msgs[0]["params"]
        assert isinstance(got[1], _Step) and got[1].note == "x"
        _same(msgs[1].positions, got[1].positions)
        assert got[2:] == [{"t": "stats", 3: 1.5}, [], "done"]
    dec = codec.FrameDecoder()
    dec.feed(data[:5])
    assert list(dec) == []  # an incomplete message stays buffered


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "little") + payload


def test_a_bad_frame_costs_only_itself():
    """Unknown ext types, unregistered classes, a registered class refusing its fields, malformed msgpack: each
    comes out as a BadFrame with what could be read of it (an add's id), and the frames after it decode."""
    from shardserve.sampling_params import SamplingParams
    bad_params = msgpack.ExtType(codec.EXT_OBJECT, msgpack.packb(["SamplingParams", {"n": 0}]))
    frames = [
        _frame(msgpack.packb({"x": msgpack.ExtType(42, b"x")})),
        _frame(msgpack.packb(msgpack.ExtType(codec.EXT_OBJECT, msgpack.packb(["nobody.Registered", {}])))),
        _frame(msgpack.packb({"t": "add", "id": "r7", "prompt_token_ids": [1], "params": bad_params})),
        _frame(b"\xc1\xc1"),  # never valid msgpack
        codec.encode_frame({"ok": 1}),
    ]
    dec = codec.FrameDecoder()
    dec.feed(b"".join(frames))
    got = list(dec)
    assert len(got) == 5 and got[4] == {"ok": 1}
    assert all(isinstance(g, codec.BadFrame) for g in got[:4])
    assert "ext type" in got[0].error and "not registered" in got[1].error and "n" in got[2].error
    assert got[2].head["t"] == "add" and got[2].head["id"] == "r7"  # enough to refuse that one request
    assert got[3].head is None
    assert SamplingParams  # imported for its registration


def test_frame_decoder_bounds_a_frame():
    dec = codec.FrameDecoder(max_frame_bytes=64)
    dec.feed(codec.encode_frame(b"\0" * 100)[:10])
    with pytest.raises(ValueError, match="exceeds the bound"):
        list(dec)
    dec = codec.FrameDecoder(max_frame_bytes=64)
    dec.feed(codec.encode_frame(b"\0" * 40) + codec.encode_frame({"after": True}))
    assert list(dec) == [b"\0" * 40, {"after": True}]  # under the bound: fine, and the buffer moves on
