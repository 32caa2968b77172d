"""LazyTensor: a view of a checkpoint tensor that reads from disk only the slice a rank keeps."""
from __future__ import annotations

from typing import Any

import torch


class ReadCounter:
    """Counts the bytes actually materialised from checkpoints (to prove each rank reads only its share)."""

    def __init__(self) -> None:
        self.bytes_read = 0


class LazyTensor:
    """A tensor (or a safetensors slice) plus pending narrow() calls, materialised by load().

    Weight loaders narrow it to the rank's shard first, so only that shard is read from the file.
    """

    def __init__(self, source: Any, shape: tuple[int, ...], dtype: torch.dtype | None = None,
                 counter: ReadCounter | None = None, index: tuple[slice, ...] | None = None) -> None:
        self._source = source
        self.shape = tuple(shape)
        self.dtype = dtype
        self._counter = counter
        self._index = index or tuple(slice(0, s) for s in shape)

    @classmethod
    def wrap(cls, t: torch.Tensor) -> "LazyTensor":
        return cls(t, tuple(t.shape), t.dtype)

    def narrow(self, dim: int, start: int, length: int) -> "LazyTensor":
        dim = dim % len(self.shape)
        if start < 0 or start + length > self.shape[dim]:
            raise ValueError(f"narrow({dim}, {start}, {length}) out of range for shape {self.shape}")
        index = list(self._index)
        base = index[dim].start
        index[dim] = slice(base + start, base + start + length)
        shape = list(self.shape)
        shape[dim] = length
        return LazyTensor(self._source, tuple(shape), self.dtype, self._counter, tuple(index))

    def chunk(self, num: int, dim: int, idx: int) -> "LazyTensor":
        """The idx-th of num equal parts along dim."""
        size = self.shape[dim] // num
        return self.narrow(dim, idx * size, size)

    def load(self) -> torch.Tensor:
        if isinstance(self._source, torch.Tensor):
            t = self._source[self._index] if self._source.dim() else self._source
        else:  # safetensors PySafeSlice: reads only the indexed bytes
            t = self._source[self._index] if self.shape else self._source[:]
        if self._counter is not None:
            self._counter.bytes_read += t.numel() * t.element_size()
        return t
