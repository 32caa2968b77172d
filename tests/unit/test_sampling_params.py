"""SamplingParams: validation of every field, normalisation, transport round trip."""

from __future__ import annotations

import math

import msgpack
import pytest

from shardserve.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults_are_valid() -> None:
    p = SamplingParams()
    assert p.n == 1 and p.temperature == 1.0 and p.max_tokens == 16
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.greedy


# (field, bad value, fragments the message must contain)
BAD_VALUES = [
    ("n", 0, ["n", ">= 1", "0"]),
    ("n", 1.0, ["n", "int", "1.0"]),
    ("n", True, ["n", "int", "True"]),
    ("temperature", -0.1, ["temperature", ">= 0", "-0.1"]),
    ("temperature", math.nan, ["temperature", "nan"]),
    ("temperature", math.inf, ["temperature", "inf"]),
    ("temperature", "1", ["temperature", "number", "'1'"]),
    ("temperature", True, ["temperature", "number", "True"]),
    ("top_p", 0.0, ["top_p", "(0, 1]", "0.0"]),
    ("top_p", 1.5, ["top_p", "(0, 1]", "1.5"]),
    ("top_p", -1, ["top_p", "(0, 1]", "-1"]),
    ("top_p", None, ["top_p", "None"]),
    ("top_k", -2, ["top_k", ">= 1", "-2"]),
    ("top_k", 2.0, ["top_k", "int", "2.0"]),
    ("top_k", False, ["top_k", "int", "False"]),
    ("min_p", -0.01, ["min_p", "[0, 1]", "-0.01"]),
    ("min_p", 1.01, ["min_p", "[0, 1]", "1.01"]),
    ("presence_penalty", 2.5, ["presence_penalty", "[-2, 2]", "2.5"]),
    ("presence_penalty", -2.01, ["presence_penalty", "[-2, 2]", "-2.01"]),
    ("frequency_penalty", 3, ["frequency_penalty", "[-2, 2]", "3"]),
    ("frequency_penalty", -3, ["frequency_penalty", "[-2, 2]", "-3"]),
    ("frequency_penalty", "0", ["frequency_penalty", "number"]),
    ("repetition_penalty", 0.0, ["repetition_penalty", "> 0", "0.0"]),
    ("repetition_penalty", -1.0, ["repetition_penalty", "> 0", "-1.0"]),
    ("seed", 1.5, ["seed", "int", "1.5"]),
    ("seed", True, ["seed", "int", "True"]),
    ("seed", 2**64, ["seed", "2**64", str(2**64)]),
    ("seed", -(2**63) - 1, ["seed", "-2**63"]),
    ("stop", "", ["stop", "empty"]),
    ("stop", ["ok", ""], ["stop", "empty"]),
    ("stop", [1], ["stop", "str", "1"]),
    ("stop", 5, ["stop", "5"]),
    ("stop_token_ids", [1, -1], ["stop_token_ids", ">= 0", "-1"]),
    ("stop_token_ids", [1.0], ["stop_token_ids", "int", "1.0"]),
    ("stop_token_ids", [True], ["stop_token_ids", "int", "True"]),
    ("stop_token_ids", 7, ["stop_token_ids", "7"]),
    ("include_stop_str_in_output", 1, ["include_stop_str_in_output", "bool", "1"]),
    ("ignore_eos", "yes", ["ignore_eos", "bool", "yes"]),
    ("skip_special_tokens", None, ["skip_special_tokens", "bool", "None"]),
    ("spaces_between_special_tokens", 0, ["spaces_between_special_tokens", "bool"]),
    ("max_tokens", 0, ["max_tokens", ">= 1", "0"]),
    ("max_tokens", 16.0, ["max_tokens", "int", "16.0"]),
    ("max_tokens", True, ["max_tokens", "int", "True"]),
    ("min_tokens", -1, ["min_tokens", ">= 0", "-1"]),
    ("min_tokens", 1.0, ["min_tokens", "int", "1.0"]),
    ("min_tokens", 17, ["min_tokens", "max_tokens", "16", "17"]),
    ("logprobs", -1, ["logprobs", f"[0, {MAX_LOGPROBS}]", "-1"]),
    ("logprobs", MAX_LOGPROBS + 1, ["logprobs", f"[0, {MAX_LOGPROBS}]", str(MAX_LOGPROBS + 1)]),
    ("logprobs", 1.0, ["logprobs", "int", "1.0"]),
    ("logprobs", True, ["logprobs", "int", "True"]),
    ("prompt_logprobs", -1, ["prompt_logprobs", f"[0, {MAX_LOGPROBS}]", "-1"]),
    ("prompt_logprobs", 100, ["prompt_logprobs", f"[0, {MAX_LOGPROBS}]", "100"]),
    ("prompt_logprobs", "2", ["prompt_logprobs", "int"]),
]


@pytest.mark.parametrize("name,value,fragments", BAD_VALUES,
                         ids=[f"{n}={v!r}" for n, v, _ in BAD_VALUES])
def test_bad_value_is_rejected_with_a_clear_message(name: str, value: object,
                                                    fragments: list[str]) -> None:
    with pytest.raises(ValueError) as exc:
        SamplingParams(**{name: value})
    msg = str(exc.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


def test_every_field_has_a_validation_case() -> None:
    checked = {name for name, _, _ in BAD_VALUES}
    assert checked == set(SamplingParams().to_dict())


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0), dict(temperature=0.0), dict(temperature=2), dict(top_p=1),
    dict(top_p=1e-9),
    dict(top_k=-1), dict(top_k=0), dict(top_k=1), dict(min_p=0), dict(min_p=1),
    dict(presence_penalty=-2, frequency_penalty=2), dict(repetition_penalty=1e-3),
    dict(seed=0), dict(seed=-1), dict(seed=2**64 - 1), dict(max_tokens=None, min_tokens=1000),
    dict(max_tokens=1, min_tokens=1), dict(logprobs=0), dict(logprobs=MAX_LOGPROBS),
    dict(prompt_logprobs=0), dict(n=8, temperature=0.0),
])
def test_edge_values_are_accepted(kwargs: dict) -> None:
    SamplingParams(**kwargs)


def test_ints_become_floats_for_float_fields() -> None:
    p = SamplingParams(temperature=0, top_p=1, presence_penalty=1, repetition_penalty=2)
    for name in ("temperature", "top_p", "presence_penalty", "repetition_penalty"):
        assert type(getattr(p, name)) is float


def test_stop_normalisation() -> None:
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    stops = ["x"]
    p = SamplingParams(stop=stops)
    assert p.stop == ["x"] and p.stop is not stops  # our own copy
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy


def test_stop_token_ids_and_eos() -> None:
    p = SamplingParams(stop_token_ids=[5, 7, 5])
    assert p.all_stop_token_ids == frozenset({5, 7})
    assert p.stop_ids_with_eos([2]) == frozenset({2, 5, 7})
    q = SamplingParams(stop_token_ids=[5], ignore_eos=True)
    assert q.stop_ids_with_eos([2]) == frozenset({5})


def test_to_dict_from_dict_round_trip_through_msgpack() -> None:
    p = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.5,
                       frequency_penalty=-0.5, repetition_penalty=1.1, seed=2**63 + 5,
                       stop=["\n\n", "END"], stop_token_ids=[1, 2], include_stop_str_in_output=True,
                       ignore_eos=True, max_tokens=None, min_tokens=4, logprobs=5,
                       prompt_logprobs=0, skip_special_tokens=False,
                       spaces_between_special_tokens=False)
    d = p.to_dict()
    for v in d.values():
        assert v is None or isinstance(v, (int, float, bool, str, list))
    wire = msgpack.packb(d)
    back = SamplingParams.from_dict(msgpack.unpackb(wire))
    assert back == p
    assert SamplingParams.from_dict(SamplingParams().to_dict()) == SamplingParams()
    assert SamplingParams.from_dict({"temperature": 0}) == SamplingParams(temperature=0.0)


def test_from_dict_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown SamplingParams fields: \\['best_of'\\]"):
        SamplingParams.from_dict({"best_of": 2})
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_dict({"top_p": 2.0})
    with pytest.raises(ValueError, match="dict"):
        SamplingParams.from_dict([("n", 1)])  # type: ignore[arg-type]


def test_clone_is_deep() -> None:
    p = SamplingParams(stop=["a"], stop_token_ids=[1])
    c = p.clone()
    assert c == p
    c.stop.append("b")
    c.stop_token_ids.append(2)
    assert p.stop == ["a"] and p.stop_token_ids == [1]
