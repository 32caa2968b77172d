"""SamplingParams: the per-request decoding knobs, validated at construction and msgpack-safe."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import Any

from shardserve.distributed import codec

# Most top logprobs a request may ask for, per generated token and per prompt token (OpenAI's cap
# is 20 for chat `top_logprobs`; completions' `logprobs` is capped at 5 by OpenAI, 20 here).
MAX_LOGPROBS = 20
# Temperatures below this are greedy (argmax); dividing logits by them would overflow.
GREEDY_TEMPERATURE_EPS = 1e-5
# Range torch.Generator.manual_seed accepts (and msgpack can carry).
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@codec.register(name="SamplingParams")
@dataclass
class SamplingParams:
    """How to pick the tokens of one request.

    Penalties follow vLLM: `repetition_penalty` (HF/CTRL style) applies to every token seen in the
    prompt or the output; `presence_penalty` / `frequency_penalty` (OpenAI style) apply to the
    counts of tokens in the output only. A `seed` makes the request's samples independent of the
    batch it lands in; with `n > 1` the engine derives one generator per child from it.
    `max_tokens=None` lets the engine run to the model's context length.
    """

    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 or -1 = disabled; else >= 1
    min_p: float = 0.0  # [0, 1]
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    repetition_penalty: float = 1.0  # > 0
    seed: int | None = None
    stop: list[str] | str | None = None  # normalised to list[str]
    stop_token_ids: list[int] | None = None  # normalised to list[int]
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # >= 1; None = up to the context length
    min_tokens: int = 0  # >= 0, <= max_tokens
    logprobs: int | None = None  # top logprobs per generated token, [0, MAX_LOGPROBS]
    prompt_logprobs: int | None = None  # top logprobs per prompt token, [0, MAX_LOGPROBS]
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self) -> None:
        self._check_int("n", lo=1)
        self._check_float("temperature", lo=0.0, lo_open=False, hi=None, range_text=">= 0")
        self._check_float("top_p", lo=0.0, lo_open=True, hi=1.0, range_text="in (0, 1]")
        if not _is_int(self.top_k):
            raise ValueError(f"top_k must be an int, got {self.top_k!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 or -1 (disabled) or >= 1, got {self.top_k}")
        self._check_float("min_p", lo=0.0, lo_open=False, hi=1.0, range_text="in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            self._check_float(name, lo=-2.0, lo_open=False, hi=2.0, range_text="in [-2, 2]")
        self._check_float("repetition_penalty", lo=0.0, lo_open=True, hi=None, range_text="> 0")
        if self.seed is not None:
            if not _is_int(self.seed):
                raise ValueError(f"seed must be an int or None, got {self.seed!r}")
            if not _SEED_MIN <= self.seed <= _SEED_MAX:
                raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")
        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.max_tokens is not None:
            self._check_int("max_tokens", lo=1, none_ok=True)
        self._check_int("min_tokens", lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), "
                             f"got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is None:
                continue
            if not _is_int(v):
                raise ValueError(f"{name} must be an int in [0, {MAX_LOGPROBS}] or None, got {v!r}")
            if not 0 <= v <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {v}")

    # -- validation helpers -------------------------------------------------------------------

    def _check_int(self, name: str, lo: int, none_ok: bool = False) -> None:
        v = getattr(self, name)
        if not _is_int(v):
            kind = "an int or None" if none_ok else "an int"
            raise ValueError(f"{name} must be {kind}, got {v!r}")
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")

    def _check_float(self, name: str, lo: float, lo_open: bool, hi: float | None,
                     range_text: str) -> None:
        v = getattr(self, name)
        if not _is_number(v):
            raise ValueError(f"{name} must be a number {range_text}, got {v!r}")
        v = float(v)
        bad = (not math.isfinite(v) or (v <= lo if lo_open else v < lo)
               or (hi is not None and v > hi))
        if bad:
            raise ValueError(f"{name} must be {range_text}, got {v}")
        setattr(self, name, v)  # ints become floats so to_dict / equality are stable

    @staticmethod
    def _normalise_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a str, a list of str or None, got {stop!r}")
        for s in stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must contain only str, got {s!r}")
            if not s:
                raise ValueError("stop must not contain empty strings, got ''")
        return list(stop)

    @staticmethod
    def _normalise_stop_token_ids(ids: Any) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of int or None, got {ids!r}")
        for t in ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must contain only ints >= 0, got {t!r}")
        return list(ids)

    # -- derived views ------------------------------------------------------------------------

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def all_stop_token_ids(self) -> frozenset[int]:
        """The request's own stop token ids; EOS is the engine's to add (`stop_ids_with_eos`)."""
        return frozenset(self.stop_token_ids or ())

    def stop_ids_with_eos(self, eos_token_ids: list[int] | tuple[int, ...]) -> frozenset[int]:
        """Token ids that end this request: its stop_token_ids plus EOS unless `ignore_eos`."""
        ids = set(self.stop_token_ids or ())
        if not self.ignore_eos:
            ids.update(eos_token_ids)
        return frozenset(ids)

    # -- transport ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (int, float, bool, str, None, lists of those): msgpack-safe."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, list) else v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        """Inverse of to_dict; unknown keys are an error, missing keys take the defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"SamplingParams.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SamplingParams fields: {unknown}")
        return cls(**d)

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)
