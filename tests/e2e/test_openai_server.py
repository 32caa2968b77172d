"""The real server driven by the official openai client: completions and chat, streaming or not, n, stop, seed,
logprobs, usage; greedy output equal to the offline LLM; many concurrent streams; disconnect frees the KV blocks."""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from e2e_helpers import API_KEY, MODEL_NAME, metric_value
from shardserve import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiproc")]

PROMPTS = ["Hello world", "The capital of France is", "Once upon a time"]
GREEDY = dict(temperature=0.0, max_tokens=12)


def offline_texts(llm, prompts, **kw) -> list[str]:
    outs = llm.generate(prompts, SamplingParams(**{**GREEDY, **kw}), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def test_health_models_version(server):
    assert 503 in server.health_codes  # /health says 503 while the engine loads
    h = server.health().json()
    assert h["status"] == "ok" and h["replicas"][0]["healthy"]
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, timeout=30, max_retries=0) as c:
        assert [m.id for m in c.models.list().data] == [MODEL_NAME]
    r = httpx.get(f"{server.url}/version", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert r.status_code == 200 and r.json()["version"]


def test_completion_greedy_matches_offline(client, offline_llm):
    ref = offline_texts(offline_llm, PROMPTS)
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS, **GREEDY)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == ref
    assert all(c.finish_reason == "length" for c in r.choices)
    tok = offline_llm.get_tokenizer()
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in PROMPTS)
    assert r.usage.completion_tokens == 12 * len(PROMPTS)
    # token-id prompts (one list, and a list of lists) give the same text
    ids = [tok.encode(p) for p in PROMPTS]
    r1 = client.completions.create(model=MODEL_NAME, prompt=ids[0], **GREEDY)
    assert r1.choices[0].text == ref[0]
    r2 = client.completions.create(model=MODEL_NAME, prompt=ids[1:], **GREEDY)
    assert [c.text for c in r2.choices] == ref[1:]


def test_completion_streaming_matches_offline(client, offline_llm):
    ref = offline_texts(offline_llm, PROMPTS[:1])[0]
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], stream=True,
                                       stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_echo_and_logprobs(client, offline_llm):
    out = offline_llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=6, logprobs=2),
                               use_tqdm=False)[0].outputs[0]
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], temperature=0, max_tokens=6, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)  # top 2, plus the sampled token if not among them
    assert lp.token_logprobs == pytest.approx([e["logprob"] for e in out.logprobs], abs=1e-4)
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    e = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], temperature=0, max_tokens=6, logprobs=1,
                                  echo=True)
    c = e.choices[0]
    n_prompt = e.usage.prompt_tokens
    assert c.text == PROMPTS[0] + r.choices[0].text
    assert len(c.logprobs.tokens) == n_prompt + 6 and c.logprobs.token_logprobs[0] is None
    assert all(x is not None for x in c.logprobs.token_logprobs[1:])


def test_chat_matches_offline_and_streams(client, offline_llm):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]
    ref = offline_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    r = client.chat.completions.create(model=MODEL_NAME, messages=msgs, temperature=0, max_completion_tokens=10)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids) and r.usage.completion_tokens == 10
    stream = client.chat.completions.create(model=MODEL_NAME, messages=msgs, temperature=0, max_tokens=10,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.prompt_tokens == len(ref.prompt_token_ids)


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                       temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    assert all(len(t.top_logprobs) == 3 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-4) for t in content)  # greedy


def test_n_seed_and_stop(client, offline_llm):
    kw = dict(temperature=1.0, max_tokens=8, seed=1234, n=3)
    a = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], **kw)
    b = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], **kw)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert len(texts) == 3 and len(set(texts)) > 1  # the n samples differ
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]  # the seed reproduces them
    ref = offline_llm.generate([PROMPTS[2]], SamplingParams(**kw), use_tqdm=False)[0]
    assert texts == [o.text for o in ref.outputs]
    # stop: cut the greedy text at a word it contains
    full = offline_texts(offline_llm, PROMPTS[1:2], max_tokens=16)[0]
    word = next(full[k:k + 3] for k in range(len(full) // 2, len(full)) if full[k:k + 3].strip())
    cut = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], temperature=0, max_tokens=16, stop=[word])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[:full.index(word)]


def test_tokenize_detokenize(server, offline_llm):
    h = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world"}, headers=h, timeout=10).json()
    assert r["tokens"] == offline_llm.get_tokenizer().encode("Hello world") and r["count"] == len(r["tokens"])
    d = httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"][1:]}, headers=h, timeout=10).json()
    assert d["prompt"] == "Hello world"


def test_many_concurrent_streams(server, offline_llm):
    prompts = [f"Request number {i} says" for i in range(16)]
    ref = offline_texts(offline_llm, prompts, max_tokens=10)

    async def one(c: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None]:
        stream = await c.completions.create(model=MODEL_NAME, prompt=prompt, stream=True, temperature=0,
                                            max_tokens=10)
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, timeout=120,
                                      max_retries=0) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    results = asyncio.run(main())
    assert [t for t, _ in results] == ref
    assert all(r == "length" for _, r in results)


def test_disconnect_aborts_and_frees_blocks(server):
    def free_blocks() -> float:
        return metric_value(server.metrics(), "shardserve:kv_cache_free_blocks", replica="0")

    def aborted() -> float:
        return metric_value(server.metrics(), "shardserve:request_success_total", finished_reason="abort")

    deadline = time.monotonic() + 10
    while free_blocks() == 0 and time.monotonic() < deadline:  # the first stats report of a fresh core
        time.sleep(0.1)
    start_free, start_aborted = free_blocks(), aborted()
    assert start_free > 0
    body = {"model": MODEL_NAME, "prompt": "A long story: " * 10, "max_tokens": 300, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status_code == 200
            events, lines = 0, r.iter_lines()  # keep the iterator alive: dropping it closes the connection
            for line in lines:
                events += line.startswith("data: ")
                if events >= 3:
                    break
            deadline = time.monotonic() + 10
            while free_blocks() >= start_free and time.monotonic() < deadline:
                time.sleep(0.1)
            assert free_blocks() < start_free  # the request holds blocks while it streams
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 15
    while (free_blocks() != start_free or aborted() <= start_aborted) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert free_blocks() == start_free
    assert aborted() == start_aborted + 1


def test_metrics_exposed(server, client):
    client.completions.create(model=MODEL_NAME, prompt="metrics", max_tokens=3)
    text = server.metrics()
    for name in ["shardserve:num_requests_running", "shardserve:num_requests_waiting",
                 "shardserve:kv_cache_usage_perc", "shardserve:prompt_tokens_total",
                 "shardserve:generation_tokens_total", "shardserve:num_preemptions_total",
                 "shardserve:request_success_total", "shardserve:time_to_first_token_seconds_bucket",
                 "shardserve:inter_token_latency_seconds_bucket", "shardserve:e2e_request_latency_seconds_bucket"]:
        assert name in text, name
    assert metric_value(text, "shardserve:generation_tokens_total", replica="0") >= 3
    assert metric_value(text, "shardserve:request_success_total", finished_reason="length") >= 1
