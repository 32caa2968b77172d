"""msgpack wire format for control-plane messages: plain values, torch tensors, registered dataclasses; never pickle.

What round-trips through `encode` / `decode`:

- None, bool, int (up to 64 bits), float, str, bytes; lists and tuples (both come back as lists);
  dicts with str or int keys; any nesting of these.
- `torch.Tensor` (any strided CPU or device tensor; decoded on CPU): msgpack ext type 1 whose
  payload is `u32 header length | msgpack [dtype name, shape] | raw little-endian bytes`. Every
  dtype is carried as raw bytes, so bfloat16 and bool need no numpy. Non-contiguous tensors are
  made contiguous; autograd history, conjugate and negative bits are dropped (values kept).
- `torch.dtype` (ext type 3, by name).
- Classes registered with `@register`: ext type 2 carrying `[name, fields]`; decoded by
  `cls.from_dict(fields)` if the class defines it, else `cls(**fields)`. `fields` is
  `obj.to_dict()` if defined, else the dataclass's init fields (shallow: tensors inside stay tensors).
- Other objects that define `to_dict()` are encoded as that dict and decode as a plain dict.

A byte stream (a socket) carries length-prefixed frames (`encode_frame`) read with `FrameDecoder`: feed it bytes as
they arrive, in pieces of any size, and iterate it for the messages completed so far. A frame that does not decode
comes out as a `BadFrame` (with what could be read of it) and the stream goes on; a frame's size is bounded.

Decoding builds only the types above: tensors of a fixed dtype list, and classes someone registered
in the decoding process (the module that registers a class must be imported there). Anything else
raises, so a peer can never make us run code.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import struct
import sys
from typing import Any, Callable, TypeVar

import msgpack

__all__ = ["encode", "decode", "register", "encode_frame", "FrameDecoder", "BadFrame", "EXT_TENSOR", "EXT_OBJECT", "EXT_DTYPE"]

EXT_TENSOR = 1
EXT_OBJECT = 2
EXT_DTYPE = 3

_HEADER_LEN = struct.Struct("<I")

# dtypes a peer may ask us to build, by torch attribute name (missing ones are skipped).
_DTYPE_NAMES = (
    "float64", "float32", "float16", "bfloat16",
    "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
    "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
)
_dtypes_by_name: dict[str, Any] | None = None

_registry_by_name: dict[str, type] = {}
_registry_by_cls: dict[type, str] = {}

T = TypeVar("T", bound=type)


def _torch():
    import torch  # deferred: processes that never see a tensor need not pay for importing torch

    return torch


def _dtypes() -> dict[str, Any]:
    global _dtypes_by_name
    if _dtypes_by_name is None:
        torch = _torch()
        _dtypes_by_name = {n: getattr(torch, n) for n in _DTYPE_NAMES if hasattr(torch, n)}
    return _dtypes_by_name


def _dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _dtypes():
        raise TypeError(f"codec cannot carry tensors of dtype {dtype}")
    return name


# ----------------------------------------------------------------------------------------- classes


def register(cls: T | None = None, *, name: str | None = None) -> T | Callable[[T], T]:
    """Class decorator: let instances of `cls` round-trip typed through `encode` / `decode`.

    `cls` must be a dataclass or define `to_dict()`; it may define a `from_dict(d)` classmethod.
    `name` (default `module.QualName`) is what goes on the wire, so it must be the same in the
    encoding and decoding processes.
    """

    def deco(c: T) -> T:
        if not (dataclasses.is_dataclass(c) or callable(getattr(c, "to_dict", None))):
            raise TypeError(f"{c.__qualname__} must be a dataclass or define to_dict()")
        wire_name = name or f"{c.__module__}.{c.__qualname__}"
        known = _registry_by_name.get(wire_name)
        if known is not None and known is not c:
            # Re-registering after a module reload is fine; two classes sharing a name is not.
            if (known.__module__, known.__qualname__) != (c.__module__, c.__qualname__):
                raise ValueError(f"codec name {wire_name!r} already registered for {known!r}")
        _registry_by_name[wire_name] = c
        _registry_by_cls[c] = wire_name
        return c

    return deco(cls) if cls is not None else deco


def _fields(obj: Any) -> dict:
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


# ----------------------------------------------------------------------------------------- tensors


def _encode_tensor(t) -> msgpack.ExtType:
    torch = _torch()
    if t.layout != torch.strided or t.is_quantized:
        raise TypeError(f"codec carries dense strided tensors only, got layout {t.layout}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    header = msgpack.packb([_dtype_name(t.dtype), list(t.shape)], use_bin_type=True)
    nbytes = t.numel() * t.element_size()
    # Contiguous CPU tensor: its bytes are the nbytes starting at data_ptr (storage offset included).
    raw = ctypes.string_at(t.data_ptr(), nbytes) if nbytes else b""
    return msgpack.ExtType(EXT_TENSOR, b"".join((_HEADER_LEN.pack(len(header)), header, raw)))


def _decode_tensor(data: bytes):
    torch = _torch()
    view = memoryview(data)
    if len(view) < _HEADER_LEN.size:
        raise ValueError("truncated tensor payload")
    (hlen,) = _HEADER_LEN.unpack_from(view, 0)
    start = _HEADER_LEN.size + hlen
    dtype_name, shape = msgpack.unpackb(view[_HEADER_LEN.size : start], raw=False)
    dtype = _dtypes().get(dtype_name)
    if dtype is None:
        raise ValueError(f"unknown tensor dtype {dtype_name!r} on the wire")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"bad tensor shape {shape!r} on the wire")
    raw = view[start:]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != math.prod(shape) * itemsize:
        raise ValueError(f"tensor payload has {len(raw)} bytes, shape {shape} x {dtype} needs more/less")
    if len(raw) == 0:
        return torch.empty(shape, dtype=dtype)
    # bytearray: a private, writable copy the tensor owns; then reinterpret the bytes.
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)  # [nbytes]
    return flat.view(dtype).reshape(shape)


# ----------------------------------------------------------------------------------------- hooks


def _default(obj: Any) -> Any:
    torch = sys.modules.get("torch")  # if torch was never imported, obj cannot be a tensor
    if torch is not None:
        if isinstance(obj, torch.Tensor):
            return _encode_tensor(obj)
        if isinstance(obj, torch.dtype):
            return msgpack.ExtType(EXT_DTYPE, _dtype_name(obj).encode())
        if isinstance(obj, torch.Size):
            return list(obj)
    cls = type(obj)
    wire_name = _registry_by_cls.get(cls)
    if wire_name is not None:
        body = msgpack.packb([wire_name, _fields(obj)], default=_default, use_bin_type=True)
        return msgpack.ExtType(EXT_OBJECT, body)
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if cls.__module__ == "numpy" and getattr(obj, "ndim", None) == 0:
        return obj.item()  # numpy scalar
    raise TypeError(
        f"codec cannot encode {cls.__module__}.{cls.__qualname__}: use plain values or tensors, "
        "give the class to_dict(), or decorate it with @shardserve.distributed.codec.register"
    )


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_TENSOR:
        return _decode_tensor(data)
    if code == EXT_OBJECT:
        wire_name, fields = _unpack(data)
        cls = _registry_by_name.get(wire_name)
        if cls is None:
            raise ValueError(
                f"codec type {wire_name!r} is not registered in this process; "
                "import the module that defines it before decoding"
            )
        from_dict = getattr(cls, "from_dict", None)
        return from_dict(fields) if callable(from_dict) else cls(**fields)
    if code == EXT_DTYPE:
        dtype = _dtypes().get(data.decode())
        if dtype is None:
            raise ValueError(f"unknown dtype {data!r} on the wire")
        return dtype
    raise ValueError(f"unknown msgpack ext type {code}")


def _unpack(data) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False, use_list=True)


# ----------------------------------------------------------------------------------------- API


def encode(obj: Any) -> bytes:
    """Serialize `obj` (see the module docstring for what is supported) to msgpack bytes."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def decode(data: bytes | bytearray | memoryview) -> Any:
    """Inverse of `encode`. Raises ValueError on malformed or unknown input; never runs peer code."""
    return _unpack(data)


_FRAME_LEN = struct.Struct("<I")


def encode_frame(obj: Any) -> bytes:
    """`encode(obj)` behind a 4-byte little-endian length: one frame of a byte stream (see FrameDecoder)."""
    data = encode(obj)
    if len(data) >= 1 << 32:
        raise ValueError(f"a message of {len(data)} bytes does not fit in one frame")
    return _FRAME_LEN.pack(len(data)) + data


@dataclasses.dataclass
class BadFrame:
    """A frame that did not decode (unregistered class, a registered class refusing its fields, malformed bytes).

    The stream itself is intact: the next frame decodes as usual. `head` is what could still be read of the frame
    as plain msgpack with every extension left out (e.g. {"t": "add", "id": ...}), so the receiver can answer the
    sender about that one message; None if even that failed."""
    error: str
    head: dict | None = None


class FrameDecoder:
    """Length-prefixed frames (`encode_frame`) over a byte stream: `feed()` bytes as they arrive (a frame may be
    split anywhere, several may come at once), then iterate for the messages completed so far.

    A frame that does not decode comes out as a BadFrame and costs nothing else: one bad message never breaks the
    channel. A frame longer than `max_frame_bytes` raises ValueError (a peer cannot make us hold unbounded memory);
    after that the channel must be dropped."""

    def __init__(self, max_frame_bytes: int = 1 << 30) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def __iter__(self) -> "FrameDecoder":
        return self

    def __next__(self) -> Any:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < _FRAME_LEN.size:
            raise StopIteration
        (n,) = _FRAME_LEN.unpack_from(buf, pos)
        if n > self.max_frame_bytes:
            raise ValueError(f"codec stream: a frame of {n} bytes exceeds the bound of {self.max_frame_bytes}")
        start = pos + _FRAME_LEN.size
        if len(buf) - start < n:
            raise StopIteration
        self._pos = start + n
        payload = bytes(memoryview(buf)[start:start + n])
        try:
            return _unpack(payload)
        except Exception as e:  # noqa: BLE001 - any refusal of this one frame; the stream goes on
            return BadFrame(f"{type(e).__name__}: {e}", _head(payload))


def _head(payload: bytes) -> dict | None:
    try:
        head = msgpack.unpackb(payload, raw=False, strict_map_key=False, ext_hook=lambda code, data: None)
    except Exception:  # noqa: BLE001
        return None
    return head if isinstance(head, dict) else None
