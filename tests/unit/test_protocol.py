"""OpenAI request parsing (strict types, field-named 400s, mapping to SamplingParams) and the engine-core wire format
(deltas in, full outputs rebuilt), without any server or process."""
from __future__ import annotations

import pytest

from shardserve.distributed import codec
from shardserve.engine.output_wire import OutputAccumulator, OutputDelta, OutputEncoder
from shardserve.entrypoints.openai.protocol import (APIError, ChatCompletionRequest, CompletionRequest, parse_body,
                                                    usage)
from shardserve.outputs import CompletionOutput, RequestMetrics, RequestOutput


def comp(**kw) -> CompletionRequest:
    return parse_body(__import__("json").dumps({"prompt": "hi", **kw}).encode(), CompletionRequest)


def chat(**kw) -> ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "hi"}], **kw}
    return parse_body(__import__("json").dumps(body).encode(), ChatCompletionRequest)


@pytest.mark.parametrize("raw,words", [
    (b"{not json", ["not valid JSON"]),
    (b"[1, 2]", ["JSON object"]),
    (b"", ["JSON object"]),
    (b'{"max_tokens": 3}', ["missing required field: prompt"]),
    (b'{"prompt": "a", "max_tokens": "3"}', ["max_tokens", "integer"]),
    (b'{"prompt": "a", "max_tokens": 3.0}', ["max_tokens", "integer"]),
    (b'{"prompt": "a", "echo": 1}', ["echo", "boolean"]),
    (b'{"prompt": {"a": 1}}', ["prompt must be a string, a list of strings"]),
    (b'{"prompt": "a", "stop": 3}', ["stop must be a string or a list"]),
])
def test_parse_errors_are_400_naming_the_field(raw, words):
    with pytest.raises(APIError) as e:
        parse_body(raw, CompletionRequest)
    assert e.value.status == 400
    for w in words:
        assert w in e.value.message
    body = e.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"


def test_completion_defaults_and_extra_fields():
    p = comp().sampling_params()
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.logprobs) == (16, 1.0, 1.0, 1, None)
    p = comp(max_tokens=5, temperature=0, top_k=3, min_p=0.1, repetition_penalty=1.2, ignore_eos=True,
             min_tokens=2, stop=["\n"], seed=7, n=2, presence_penalty=0.5, stop_token_ids=[5],
             include_stop_str_in_output=True, user="someone").sampling_params()
    assert (p.max_tokens, p.temperature, p.top_k, p.min_p, p.repetition_penalty, p.ignore_eos, p.min_tokens) == \
        (5, 0.0, 3, 0.1, 1.2, True, 2)
    assert (p.stop, p.seed, p.n, p.presence_penalty, p.stop_token_ids, p.include_stop_str_in_output) == \
        (["\n"], 7, 2, 0.5, [5], True)
    e = comp(echo=True, logprobs=2).sampling_params()
    assert e.logprobs == 2 and e.prompt_logprobs == 2  # echo shows the prompt's logprobs too


@pytest.mark.parametrize("kw,param", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"), ({"logprobs": 21}, "logprobs"), ({"min_p": 2.0}, "min_p"), ({"top_k": -3}, "top_k"),
    ({"best_of": 3}, "best_of"), ({"logit_bias": {"5": 1.0}}, "logit_bias"), ({"suffix": "x"}, "suffix"),
])
def test_bad_values_name_the_param(kw, param):
    with pytest.raises(APIError) as e:
        comp(**kw).sampling_params()
    assert e.value.status == 400 and e.value.param == param and param in e.value.message


def test_prompt_shapes():
    assert comp(prompt="a").prompts() == ["a"]
    assert comp(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert comp(prompt=[1, 2, 3]).prompts() == [[1, 2, 3]]
    assert comp(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    with pytest.raises(APIError, match="must not be empty"):
        comp(prompt=[]).prompts()


def test_chat_fields():
    assert chat().sampling_params().max_tokens is None  # up to the context length
    assert chat(max_tokens=9, max_completion_tokens=4).sampling_params().max_tokens == 4
    assert chat(logprobs=True, top_logprobs=3).sampling_params().logprobs == 3
    assert chat(logprobs=True).sampling_params().logprobs == 0
    assert chat().sampling_params().logprobs is None
    for kw, param in [({"top_logprobs": 2}, "top_logprobs"), ({"tools": [{"type": "function"}]}, "tools"),
                      ({"messages": []}, "messages"), ({"max_completion_tokens": -2}, "max_completion_tokens"),
                      ({"response_format": {"type": "json_object"}}, "response_format")]:
        with pytest.raises(APIError) as e:
            chat(**kw).sampling_params()
        assert e.value.param == param, kw
    parts = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert parts.messages[0].as_template_dict() == {"role": "user", "content": "ab"}
    img = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(APIError, match="image_url"):
        img.messages[0].as_template_dict()


def test_usage():
    assert usage(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


# --- the engine-core wire ---------------------------------------------------------------------------------------
def _engine_outputs() -> list[RequestOutput]:
    """What an engine emits for one request with n=2 over three steps (cumulative fields plus deltas)."""
    lp = lambda t: {"token_id": t, "logprob": -0.5, "rank": 1, "top_token_ids": [t], "top_logprobs": [-0.5]}  # noqa
    steps = [([5], [7], "He", "Wo", None, None), ([6], [8], "llo", "rld", None, "length"),
             ([9], [], " you", "", "stop", "length")]
    outs, toks, texts = [], [[], []], ["", ""]
    for k, (d0, d1, t0, t1, f0, f1) in enumerate(steps):
        comps = []
        for i, (d, t, f) in enumerate([(d0, t0, f0), (d1, t1, f1)]):
            toks[i] += d
            texts[i] += t
            comps.append(CompletionOutput(i, texts[i], list(toks[i]), [lp(x) for x in toks[i]], f,
                                          "!" if f == "stop" else None, t, list(d), [lp(x) for x in d]))
        done = k == len(steps) - 1
        outs.append(RequestOutput("r1", "hi", [1, 2, 3], comps, done,
                                  prompt_logprobs=[None, lp(2), lp(3)],
                                  metrics=RequestMetrics(1.0, 2.0, 3.0 if done else None)))
    return outs


def test_wire_round_trip_rebuilds_outputs():
    enc, acc = OutputEncoder(), OutputAccumulator()
    acc.add("r1", "hi", [1, 2, 3], n=2, want_logprobs=True)
    got = []
    for o in _engine_outputs():
        wire = codec.decode(codec.encode(enc.encode(o)))  # what crosses the socket
        assert isinstance(wire, OutputDelta)
        got.append(acc.decode(wire))
    ref = _engine_outputs()
    for g, r in zip(got, ref):
        assert g.finished == r.finished
        for gc, rc in zip(g.outputs, r.outputs):
            assert (gc.text, gc.token_ids, gc.logprobs, gc.finish_reason, gc.stop_reason) == \
                (rc.text, rc.token_ids, rc.logprobs, rc.finish_reason, rc.stop_reason)
            assert (gc.text_delta, gc.token_ids_delta) == (rc.text_delta, rc.token_ids_delta)
    assert got[0].prompt_logprobs == ref[0].prompt_logprobs  # sent once, as soon as complete
    assert got[-1].metrics.finished_time == 3.0
    assert "r1" not in acc  # finished requests are forgotten


def test_wire_sends_prompt_logprobs_once_and_fail_builds_error():
    enc = OutputEncoder()
    outs = _engine_outputs()
    assert enc.encode(outs[0]).prompt_logprobs is not None and enc.encode(outs[1]).prompt_logprobs is None
    acc = OutputAccumulator()
    acc.add("r2", None, [1], n=1, want_logprobs=False)
    failed = acc.fail("r2", "replica 0 died")
    assert failed.error == "replica 0 died" and failed.finished and failed.outputs[0].finish_reason == "error"
    assert acc.fail("r2", "again") is None and acc.decode(OutputDelta("zzz", False, [])) is None
