"""Pipeline stage partitioning: which layers each stage holds."""
from __future__ import annotations


def even_partition(num_layers: int, pp_size: int) -> list[int]:
    """Layers per stage, as even as possible; leftovers go to the middle stages first, because the first and the
    last stage also hold the embedding and the LM head."""
    if pp_size < 1:
        raise ValueError(f"pipeline-parallel size must be >= 1, got {pp_size}")
    if num_layers < pp_size:
        raise ValueError(f"cannot split {num_layers} layers over {pp_size} pipeline stages (each needs >= 1 layer); "
                         f"use --pipeline-parallel-size {num_layers} or less")
    base, extra = divmod(num_layers, pp_size)
    counts = [base] * pp_size
    middle = list(range(1, pp_size - 1))
    order = middle + [0, pp_size - 1]  # the embedding lookup is cheap, the LM head is not
    for i in order[:extra]:
        counts[i] += 1
    return counts


def layer_ranges(counts: list[int]) -> list[tuple[int, int]]:
    """[start, end) per stage from layers-per-stage counts."""
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out
