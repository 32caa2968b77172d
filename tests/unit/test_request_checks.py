"""The hostile-input checks without a server: body-size reading, prompt counts, lone surrogates, OpenAI roles and
content, request chat templates (refused, or sandboxed with time and size limits), empty API keys, the child
environment, the OpenAPI schema's request bodies, and 500s that carry only a request id."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from starlette.requests import Request

from shardserve.entrypoints.openai.chat_template import TemplateLimitError, render_request_template
from shardserve.entrypoints.openai.cli import resolve_api_key
from shardserve.entrypoints.openai.protocol import APIError, ChatCompletionRequest, parse_body
from shardserve.entrypoints.openai.request_checks import (RequestLimits, check_messages, check_prompt_shape,
                                                          check_template_kwargs, check_unicode, read_body)

LIMITS = RequestLimits(max_body_bytes=1024, max_prompts=4)


def make_request(chunks: list[bytes], content_length: int | None) -> Request:
    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    pending = list(chunks)

    async def receive():
        if pending:
            body = pending.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(pending)}
        return {"type": "http.disconnect"}
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)


@pytest.mark.parametrize("chunks,declared", [([b"x" * 2000], 2000), ([b"x" * 600] * 4, None), ([b"x" * 600] * 4, 10)])
def test_read_body_refuses_over_the_limit(chunks, declared):
    with pytest.raises(APIError) as e:
        asyncio.run(read_body(make_request(chunks, declared), 1024))
    assert e.value.status == 413 and "--max-request-body-bytes" in e.value.message and "1024" in e.value.message


def test_read_body_under_the_limit():
    assert asyncio.run(read_body(make_request([b"ab", b"cd"], 4), 1024)) == b"abcd"
    with pytest.raises(APIError) as e:
        asyncio.run(read_body(_bad_length(), 1024))
    assert e.value.status == 400


def _bad_length() -> Request:
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}
    return Request({"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"zz")]}, receive)


def test_prompt_shape():
    check_prompt_shape({"prompt": ["a"] * 4}, LIMITS, 16)
    check_prompt_shape({"prompt": list(range(16))}, LIMITS, 16)
    with pytest.raises(APIError, match="--max-prompts-per-request") as e:
        check_prompt_shape({"prompt": ["a"] * 1_000_000}, LIMITS, 16)
    assert e.value.param == "prompt"
    with pytest.raises(APIError, match="context length") as e:
        check_prompt_shape({"prompt": [1] * 17}, LIMITS, 16)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(APIError, match="prompt 1"):
        check_prompt_shape({"prompt": [[1], [1] * 17]}, LIMITS, 16)


@pytest.mark.parametrize("body,param", [
    ({"prompt": "a\ud800b"}, "prompt"),
    ({"prompt": ["ok", "a\udfffb"]}, "prompt.1"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": [{"type": "text",
                                                                                   "text": "\udc00"}]}]},
     "messages.1.content.0.text"),
    ({"stop": ["\ud800"]}, "stop.0"),
])
def test_lone_surrogates_name_the_field(body, param):
    raw = json.dumps(body).encode()
    with pytest.raises(APIError) as e:
        check_unicode(raw, json.loads(raw))
    assert e.value.status == 400 and e.value.param == param and "Unicode" in e.value.message
    json.dumps(e.value.body(), ensure_ascii=False).encode()  # the error itself is valid UTF-8


def test_valid_unicode_passes():
    for body in ({"prompt": "emoji \U0001F600"}, {"prompt": "a literal \\ud800 in text"}):
        raw = json.dumps(body).encode()
        check_unicode(raw, json.loads(raw))


def chat(messages, **kw) -> ChatCompletionRequest:
    return parse_body(json.dumps({"messages": messages, **kw}).encode(), ChatCompletionRequest)


@pytest.mark.parametrize("messages,param", [
    ([{"role": "wizard", "content": "hi"}], "messages.0.role"),
    ([{"role": "user", "content": "hi"}, {"role": "User", "content": "hi"}], "messages.1.role"),
    ([{"role": "user"}], "messages.0.content"),
    ([{"role": "user", "content": None}], "messages.0.content"),
    ([{"role": "user", "content": []}], "messages.0.content"),
    ([{"role": "system", "content": "s"}, {"role": "tool", "content": "r"}], "messages.1.tool_call_id"),
    ([{"role": "assistant", "content": "hello"}], "messages"),
    ([], "messages"),
])
def test_messages_follow_openai(messages, param):
    with pytest.raises(APIError) as e:
        check_messages(chat(messages).messages)
    assert e.value.status == 400 and e.value.param == param


def test_messages_accepted():
    check_messages(chat([{"role": "developer", "content": "d"}, {"role": "user", "content": ""},
                         {"role": "assistant", "content": "a"},
                         {"role": "tool", "content": "r", "tool_call_id": "c1"}]).messages)
    check_messages(chat([{"role": "system", "content": "s"}]).messages)
    check_messages(chat([{"role": "assistant", "content": "Once"}]).messages, continue_final_message=True)


def test_request_template_needs_trust():
    assert check_template_kwargs({"enable_thinking": False}, LIMITS) is None
    with pytest.raises(APIError, match="--trust-request-chat-template") as e:
        check_template_kwargs({"chat_template": "{{ 'ab ' * 4000000 }}"}, LIMITS)
    assert e.value.param == "chat_template_kwargs.chat_template"
    trusted = RequestLimits(trust_request_chat_template=True)
    assert check_template_kwargs({"chat_template": "{{ x }}"}, trusted) == "{{ x }}"
    with pytest.raises(APIError):
        check_template_kwargs({"chat_template": 5}, trusted)
    with pytest.raises(APIError, match="characters"):
        check_template_kwargs({"chat_template": "x" * 100_000}, trusted)


MSGS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
CHATML = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def render(src: str, msgs=MSGS, time_limit: float = 2.0, max_chars: int = 100_000, **kw) -> str:
    return render_request_template(src, msgs, kw.pop("add_generation_prompt", True),
                                   kw.pop("continue_final_message", False), {"bos_token": "<s>", **kw},
                                   time_limit, max_chars)


def test_request_template_renders():
    assert render(CHATML) == "<|user|>Hi\n<|assistant|>Hel\n<|assistant|>"
    assert render(CHATML, continue_final_message=True, add_generation_prompt=False) == \
        "<|user|>Hi\n<|assistant|>Hel"
    assert render("{{ bos_token }}{{ messages | tojson }}").startswith('<s>[{"role": "user"')


@pytest.mark.parametrize("src", [
    "{{ 'ab ' * 4000000 }}",                                   # the 134-byte template
    "{{ 4000000 * 'ab ' }}",
    "{{ ['x'] * 10**7 }}",
    "{% set a = 'x' * 1000 %}{% set b = a ~ a ~ a ~ a %}{% set c = b ~ b ~ b ~ b %}{% set d = c ~ c ~ c ~ c %}"
    "{% set e = d ~ d ~ d ~ d %}{{ e ~ e }}",
    "{{ ('a' * 1000) | replace('a', 'a' * 1000) }}",
    "{{ (['x'] * 1000) | join('y' * 100000) }}",
    "{{ ('y' * 100000).join(['x'] * 1000) }}",
    "{{ ('\t' * 1000).expandtabs(100000) }}",
    "{{ ('a' * 1000).replace('a', 'b' * 1000) }}",
    "{{ '%0999999999d' % 1 }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ 'x'|center(10**9) }}",
    "{{ ('x\n' * 1000)|indent(1000) }}",
    "{{ 2 ** 100000000 }}",
    "{{ ((2 ** 64) ** 64) ** 64 }}",
    "{% for i in range(100) %}{{ 'y' * 2000 }}{% endfor %}",   # output over the limit
])
def test_request_template_size_limits(src):
    t = time.monotonic()
    with pytest.raises(TemplateLimitError):
        render(src)
    assert time.monotonic() - t < 3.0  # refused at the limit (seconds of work unbounded it took 18.9 s), with CI slack


def test_request_template_time_limit():
    t = time.monotonic()
    with pytest.raises(TemplateLimitError, match="longer than"):
        render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", time_limit=0.3)
    assert time.monotonic() - t < 2.0


def test_request_template_is_sandboxed():
    from jinja2.exceptions import SecurityError
    with pytest.raises(SecurityError):
        render("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SecurityError):
        render("{% set x = messages.append(1) %}")


def test_empty_api_key_is_refused():
    assert resolve_api_key(None, None) is None
    assert resolve_api_key("k", "e") == "k" and resolve_api_key(None, "e") == "e"
    for flag, env in (("", None), ("  ", None), (None, ""), ("", "set")):
        with pytest.raises(ValueError, match="empty"):
            resolve_api_key(flag, env)
    from shardserve.entrypoints.openai.serving import ServerState
    with pytest.raises(ValueError, match="empty"):
        ServerState(None, None, ["m"], "m", 16, None, api_key="")  # type: ignore[arg-type]


def test_core_processes_do_not_get_the_api_key(monkeypatch):
    import subprocess

    from shardserve.engine import core_launch
    seen = {}

    class FakePopen:
        def __init__(self, cmd, stdin=None, env=None):
            seen["env"] = env
            self.stdin = open("/dev/null", "wb")
    monkeypatch.setenv("SHARDSERVE_API_KEY", "secret")
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    core_launch.launch_core({"device": "cpu"}, 0, 1, "tok", 1)
    assert "SHARDSERVE_API_KEY" not in seen["env"] and seen["env"]["OMP_NUM_THREADS"] == "1"


def fake_app():
    from shardserve.entrypoints.openai.api_server import build_app
    from shardserve.entrypoints.openai.serving import ServerState
    state = ServerState(None, None, ["m"], "m", 16, None)  # type: ignore[arg-type]
    return build_app(state, stats_interval=0)


def test_openapi_has_every_request_body():
    schema = fake_app().openapi()
    comps = schema["components"]["schemas"]
    for path, name in [("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
                       ("/tokenize", "TokenizeRequest"), ("/detokenize", "DetokenizeRequest")]:
        op = schema["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{name}"
        assert {"400", "401", "413"} <= set(op["responses"])
    assert "prompt" in comps["CompletionRequest"]["required"]
    assert "messages" in comps["ChatCompletionRequest"]["properties"]
    assert "ChatMessage" in comps and "ErrorResponse" in comps
    refs = json.dumps(schema).split('"$ref": "#/components/schemas/')[1:]
    assert all(r.split('"')[0] in comps for r in refs)  # every reference resolves
    assert "security" not in schema["paths"]["/health"]["get"]


def test_internal_error_answers_an_id_only(caplog):
    from fastapi.testclient import TestClient
    app = fake_app()

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret internals")
    r = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert r.status_code == 500
    msg = r.json()["error"]["message"]
    assert "internal server error (id err-" in msg and "secret" not in msg
    rid = msg.split("(id ")[1].split(")")[0]
    assert any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records)
