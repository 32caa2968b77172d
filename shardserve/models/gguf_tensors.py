"""GGUFLazyTensor: one tensor of a GGUF file (llama.cpp's format, read through the `gguf` package) that the weight
loaders narrow like a safetensors `LazyTensor`; load() dequantizes only the rows of the narrowed range and, within
them, only the quant blocks covering the narrowed columns (a column shard that is not block-aligned reads at most
one extra block at each edge)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from shardserve.layers.lazy_tensor import LazyTensor, ReadCounter

# Types the loader dequantizes (all through gguf.quants.dequantize); anything else is refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
_PLAIN = ("F32", "F16")  # the reader gives these as typed [rows, cols] arrays; the rest as [rows, bytes] uint8


def import_gguf():
    try:
        import gguf
    except ImportError as e:  # gguf is needed only for .gguf models
        raise ImportError("loading a .gguf model needs the `gguf` package: pip install gguf") from e
    return gguf


def check_type(tensor: Any) -> str:
    """The tensor's GGML type name, or a ValueError naming it and the supported ones."""
    name = tensor.tensor_type.name
    if name not in SUPPORTED_TYPES:
        raise ValueError(f"GGUF tensor {tensor.name!r} has type {name}, which shardserve cannot dequantize; "
                         f"supported types: {', '.join(SUPPORTED_TYPES)}")
    return name


def unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """perm[r] = the GGUF row holding HF row r, undoing llama.cpp's q/k permutation (convert_hf_to_gguf
    LlamaModel.permute: reshape(n_head, 2, half, ...).swapaxes(1, 2)); rows stay inside their head."""
    head_dim = n_rows // n_head
    half = head_dim // 2
    r = np.arange(n_rows)
    h, rem = np.divmod(r, head_dim)
    i, j = np.divmod(rem, half)
    return h * head_dim + j * 2 + i


class GGUFLazyTensor(LazyTensor):
    """A GGUF ReaderTensor in torch order ([out, in]: GGUF's `ne` reversed) with pending narrow() calls.

    `row_perm` (optional) maps each HF row to its GGUF row (llama q/k). load() returns float32, which the weight
    loaders' copy_ casts to the run's dtype. The counter counts the file bytes read (quantized bytes).
    """

    def __init__(self, tensor: Any, counter: ReadCounter | None = None, row_perm: np.ndarray | None = None,
                 index: tuple[slice, ...] | None = None) -> None:
        full = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        shape = tuple(s.stop - s.start for s in index) if index else full
        super().__init__(tensor, shape, torch.float32, counter, index)
        self._full = full
        self._row_perm = row_perm
        self.type_name = check_type(tensor)

    def narrow(self, dim: int, start: int, length: int) -> "GGUFLazyTensor":
        t = super().narrow(dim, start, length)
        return GGUFLazyTensor(self._source, self._counter, self._row_perm, t._index)

    def load(self) -> torch.Tensor:
        if 0 in self.shape:
            return torch.empty(self.shape)
        gguf = import_gguf()
        src, qtype = self._source, self._source.tensor_type
        rows = self._index[0]
        if self._row_perm is not None:
            wanted = self._row_perm[rows]
            lo, hi = int(wanted.min()), int(wanted.max()) + 1
            pick = wanted - lo
        else:
            lo, hi, pick = rows.start, rows.stop, None
        if len(self._full) == 1:  # a norm or a bias: one row of n elements
            raw, out = self._read_2d(gguf, src.data.reshape(1, -1), qtype, 0, 1, slice(lo, hi))
            out = out[0]
        else:
            raw, out = self._read_2d(gguf, src.data, qtype, lo, hi, self._index[1])
        if self._counter is not None:
            self._counter.bytes_read += raw.nbytes
        if pick is not None:
            out = out[pick]
        out = np.ascontiguousarray(out, dtype=np.float32)
        return torch.from_numpy(out if out.flags.writeable else out.copy())  # F32 rows may still be the mmap

    def _read_2d(self, gguf, data: np.ndarray, qtype, lo: int, hi: int, cols: slice):
        """(bytes read, float rows lo:hi restricted to cols) of a [rows, cols] (or [rows, bytes]) array."""
        if self.type_name in _PLAIN:
            raw = np.ascontiguousarray(data[lo:hi, cols])
            return raw, gguf.quants.dequantize(raw, qtype)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        b0, b1 = cols.start // block, -(-cols.stop // block)  # the blocks covering the columns (blocks are
        raw = np.ascontiguousarray(data[lo:hi, b0 * type_size:b1 * type_size])  # independent within a row)
        out = gguf.quants.dequantize(raw, qtype)
        first = b0 * block
        return raw, out[:, cols.start - first:cols.stop - first]
