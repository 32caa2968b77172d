"""Seeded random workloads shared by the benchmarks: prompt token ids and output lengths."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def random_workload(num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int,
                    seed: int = 0, avoid: set[int] | None = None) -> Workload:
    """Uniform lengths in [lo, hi]; token ids uniform over the vocabulary minus `avoid` (special tokens)."""
    rng = random.Random(seed)
    avoid = avoid or set()
    pool = [t for t in range(vocab_size) if t not in avoid]
    prompts = [[rng.choice(pool) for _ in range(rng.randint(*input_len))] for _ in range(num_prompts)]
    outs = [rng.randint(*output_len) for _ in range(num_prompts)]
    return Workload(prompts, outs)


def parse_range(text: str) -> tuple[int, int]:
    """'32:512' or '128' → (lo, hi)."""
    parts = [int(x) for x in str(text).split(":")]
    lo, hi = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    if lo < 1 or hi < lo:
        raise ValueError(f"bad length range {text!r}; write LO:HI with 1 <= LO <= HI, e.g. 32:512")
    return lo, hi
