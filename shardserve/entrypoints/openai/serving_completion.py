"""POST /v1/completions: prompts (text, token ids, or lists of either) → engine requests → OpenAI completion
objects, whole or as server-sent chunks."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shardserve.entrypoints.openai.protocol import APIError, CompletionRequest, finish_reason, random_id, usage
from shardserve.entrypoints.openai import protocol
from shardserve.entrypoints.openai.request_checks import parse_request
from shardserve.entrypoints.openai.serving import (OFFLOAD_CHARS, SSE_DONE, ServerState, SSEResponse, collect,
                                                   completion_logprobs, guard_stream, merged, open_streams, sse,
                                                   unless_disconnected)
from shardserve.outputs import RequestOutput


def _encode_all(state: ServerState, prompts: list[str | list[int]]) -> list[list[int]]:
    return [state.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]


async def _tokenize(state: ServerState, req: CompletionRequest) -> tuple[list[list[int]], list[str | None]]:
    """Token ids and texts of the prompts; large texts are tokenized in a worker thread (the fast tokenizer lets
    go of the GIL), so the event loop keeps answering."""
    prompts = req.prompts()
    if len(prompts) > state.limits.max_prompts:
        raise APIError(400, f"prompt has {len(prompts)} prompts, more than the server's limit of "
                            f"{state.limits.max_prompts} per request (--max-prompts-per-request)", param="prompt")
    chars = 0
    for p in prompts:
        if isinstance(p, str):
            state.check_text_length(len(p), "prompt")
            chars += len(p)
        elif not p:
            raise APIError(400, "prompt must not contain an empty list of token ids", param="prompt")
    if chars > OFFLOAD_CHARS:
        ids = await asyncio.to_thread(_encode_all, state, prompts)
    else:
        ids = _encode_all(state, prompts)
    return ids, [p if isinstance(p, str) else None for p in prompts]


def _echo_text(state: ServerState, text: str | None, ids: list[int]) -> str:
    return text if text is not None else state.tokenizer.decode(ids)


async def create_completion(state: ServerState, request: Request) -> Response:
    req = await parse_request(request, CompletionRequest, state.limits, state.max_model_len)
    model = state.check_model(req.model)
    params = req.sampling_params()
    prompts, texts = await _tokenize(state, req)
    base_id = random_id("cmpl")
    streams = await open_streams(state, base_id, prompts, params, texts)
    created = protocol.now_s()
    if req.stream:
        return SSEResponse(guard_stream(_stream(state, req, model, base_id, created, streams, prompts, texts),
                                        streams))
    finals: list[RequestOutput] = await unless_disconnected(request, collect(streams))
    choices: list[dict[str, Any]] = []
    completion_tokens = 0
    for pi, out in enumerate(finals):
        echo = _echo_text(state, texts[pi], prompts[pi]) if req.echo else ""
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            logprobs = None
            if req.logprobs is not None:
                offset = 0
                if req.echo:
                    logprobs, offset = completion_logprobs(state, prompts[pi], out.prompt_logprobs or
                                                           [None] * len(prompts[pi]), 0)
                lp, _ = completion_logprobs(state, c.token_ids, c.logprobs or [], offset)
                if logprobs is None:
                    logprobs = lp
                else:
                    for k in logprobs:
                        logprobs[k] += lp[k]
            choices.append({"index": pi * req.n + c.index, "text": echo + c.text, "logprobs": logprobs,
                            "finish_reason": finish_reason(c.finish_reason), "stop_reason": c.stop_reason})
    body = {"id": base_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "system_fingerprint": None,
            "usage": usage(sum(len(p) for p in prompts), completion_tokens)}
    return JSONResponse(body)


async def _stream(state: ServerState, req: CompletionRequest, model: str, base_id: str, created: int,
                  streams, prompts: list[list[int]], texts: list[str | None]) -> AsyncIterator[bytes]:
    n = req.n
    echo_pending = {(pi, i) for pi in range(len(prompts)) for i in range(n)} if req.echo else set()
    offsets: dict[tuple[int, int], int] = {}
    generated = 0
    prompt_tokens = sum(len(p) for p in prompts)

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        d = {"id": base_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
        if req.include_usage and req.stream_options and req.stream_options.continuous_usage_stats:
            d["usage"] = usage(prompt_tokens, generated)
        return d

    gen = merged(streams)
    try:
        async for pi, out in gen:
            choices = []
            for c in out.outputs:
                key = (pi, c.index)
                if not c.text_delta and not c.token_ids_delta and not c.finish_reason:
                    continue
                generated += len(c.token_ids_delta)
                text, logprobs = c.text_delta, None
                if key in echo_pending:
                    echo_pending.discard(key)
                    prefix = _echo_text(state, texts[pi], prompts[pi])
                    text = prefix + text
                    if req.logprobs is not None:
                        logprobs, offsets[key] = completion_logprobs(
                            state, prompts[pi], out.prompt_logprobs or [None] * len(prompts[pi]), 0)
                if req.logprobs is not None:
                    lp, offsets[key] = completion_logprobs(state, c.token_ids_delta, c.logprobs_delta or [],
                                                           offsets.get(key, 0))
                    if logprobs is None:
                        logprobs = lp
                    else:
                        for k in logprobs:
                            logprobs[k] += lp[k]
                choices.append({"index": pi * n + c.index, "text": text, "logprobs": logprobs,
                                "finish_reason": finish_reason(c.finish_reason), "stop_reason": c.stop_reason})
            if choices:
                yield sse(chunk(choices))
    finally:
        await gen.aclose()
    if req.include_usage:
        yield sse({"id": base_id, "object": "text_completion", "created": created, "model": model, "choices": [],
                   "usage": usage(prompt_tokens, generated)})
    yield SSE_DONE
