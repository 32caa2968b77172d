"""Bad input gets the right 4xx with an OpenAI-style error body that names the field; never a 500."""
from __future__ import annotations

import httpx
import openai
import pytest

from e2e_helpers import API_KEY, MODEL_NAME

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiproc")]

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMP = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}


def post(server, path: str, body, headers=AUTH, raw: bytes | None = None) -> httpx.Response:
    kw = {"content": raw, "headers": {**headers, "Content-Type": "application/json"}} if raw is not None \
        else {"json": body, "headers": headers}
    return httpx.post(f"{server.url}{path}", timeout=30, **kw)


def check_error(r: httpx.Response, status: int, *words: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], (w, err["message"])
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("path,body,words,param", [
    ("/v1/completions", {"model": MODEL_NAME}, ["prompt"], "prompt"),                       # missing field
    ("/v1/chat/completions", {"model": MODEL_NAME}, ["messages"], "messages"),
    ("/v1/completions", {**COMP, "max_tokens": "ten"}, ["max_tokens", "integer"], "max_tokens"),  # wrong types
    ("/v1/completions", {**COMP, "prompt": 5}, ["prompt"], "prompt"),
    ("/v1/completions", {**COMP, "stream": "yes"}, ["stream"], "stream"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 7}]}, ["content"], None),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, ["messages"], "messages"),
    ("/v1/completions", {**COMP, "max_tokens": -1}, ["max_tokens", ">= 1"], "max_tokens"),  # bad values
    ("/v1/completions", {**COMP, "temperature": -0.5}, ["temperature"], "temperature"),
    ("/v1/completions", {**COMP, "top_p": 1.5}, ["top_p"], "top_p"),
    ("/v1/completions", {**COMP, "n": 0}, ["n must be"], "n"),
    ("/v1/completions", {**COMP, "logprobs": 50}, ["logprobs"], "logprobs"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, ["logprobs"], "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, ["max_completion_tokens"],
     "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, ["at least one"], "messages"),
    ("/v1/completions", {**COMP, "prompt": "word " * 600}, ["context length"], "prompt"),      # too long
    ("/v1/completions", {**COMP, "max_tokens": 5000}, ["max_tokens", "512"], "max_tokens"),
    ("/v1/completions", {**COMP, "prompt": [10**6]}, ["out of range"], "prompt"),
    ("/v1/completions", {**COMP, "prompt": [2**70]}, ["cannot be encoded"], None),
    ("/v1/completions", {**COMP, "n": 1000}, ["--max-num-seqs"], "n"),
    ("/v1/completions", {**COMP, "stop": ["", "x"]}, ["stop"], "stop"),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"tokenize": True}}, ["chat template"], "messages"),
])
def test_bad_request(server, path, body, words, param):
    check_error(post(server, path, body), 400, *words, param=param)


def test_bad_json_and_body(server):
    check_error(post(server, "/v1/completions", None, raw=b'{"prompt": "hi",'), 400, "JSON")
    check_error(post(server, "/v1/completions", None, raw=b'["a list"]'), 400, "object")


def test_unknown_model_and_route(server):
    err = check_error(post(server, "/v1/completions", {**COMP, "model": "gpt-17"}), 404, "gpt-17", param="model")
    assert err["code"] == "model_not_found"
    check_error(httpx.get(f"{server.url}/v1/nothing", headers=AUTH, timeout=10), 404)


def test_openai_client_sees_errors(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, timeout=30, max_retries=0) as c:
        with pytest.raises(openai.BadRequestError, match="temperature"):
            c.completions.create(model=MODEL_NAME, prompt="hi", temperature=-1)
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", timeout=30, max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


def test_api_key(server):
    check_error(post(server, "/v1/completions", COMP, headers={}), 401, "API key")
    check_error(post(server, "/v1/completions", COMP, headers={"Authorization": "Bearer nope"}), 401)
    check_error(post(server, "/v1/completions", COMP, headers={"Authorization": API_KEY}), 401)  # no scheme
    check_error(httpx.get(f"{server.url}/v1/models", timeout=10), 401)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200   # open
    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200  # open


def test_queue_full_gives_429(start_server):
    srv = start_server(["--max-num-seqs", "1", "--max-waiting-requests", "1"])
    long = {"model": MODEL_NAME, "prompt": "go", "max_tokens": 300, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", f"{srv.url}/v1/completions", json=long) as a:  # runs (max-num-seqs 1)
            lines = a.iter_lines()
            assert a.status_code == 200 and next(line for line in lines if line.startswith("data: "))
            with c.stream("POST", f"{srv.url}/v1/completions", json=long) as b:  # accepted, waits
                assert b.status_code == 200
                r = httpx.post(f"{srv.url}/v1/completions", json={**long, "stream": False}, timeout=30)
                err = check_error(r, 429, "--max-waiting-requests")
                assert err["type"] == "rate_limit_error"
    # once the queue drains (both streams closed, so aborted), requests are served again
    assert httpx.post(f"{srv.url}/v1/completions", json=COMP, timeout=60).status_code == 200
