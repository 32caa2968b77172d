"""POST /v1/chat/completions: messages through the tokenizer's chat template → one engine request → OpenAI chat
completion objects, whole or as server-sent deltas."""
from __future__ import annotations

from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shardserve.entrypoints.openai import protocol
from shardserve.entrypoints.openai.protocol import APIError, ChatCompletionRequest, ChatMessage, finish_reason, usage
from shardserve.entrypoints.openai.serving import (SSE_DONE, ServerState, SSEResponse, chat_logprobs, collect,
                                                   guard_stream, merged, open_streams, sse, unless_disconnected)


def render_chat(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool = True,
                continue_final_message: bool = False, kwargs: dict[str, Any] | None = None) -> tuple[str, list[int]]:
    """The templated prompt and its token ids (add_special_tokens=False: the template already has BOS)."""
    msgs = [m.as_template_dict() for m in messages]
    try:
        text = state.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message, **(kwargs or {}))
    except Exception as e:  # jinja errors, bad kwargs: the client's messages did not fit the template
        raise APIError(400, f"the chat template could not render these messages: {e}", param="messages") from None
    return text, state.tokenizer.encode(text, add_special_tokens=False)


async def create_chat_completion(state: ServerState, request: Request) -> Response:
    req = protocol.parse_body(await request.body(), ChatCompletionRequest)
    model = state.check_model(req.model)
    params = req.sampling_params()
    text, ids = render_chat(state, req.messages, req.add_generation_prompt, req.continue_final_message,
                            req.chat_template_kwargs)
    base_id = protocol.random_id("chatcmpl")
    streams = await open_streams(state, base_id, [ids], params, [text])
    created = protocol.now_s()
    top_k = req.top_logprobs or 0
    if req.stream:
        return SSEResponse(guard_stream(_stream(state, req, model, base_id, created, streams, len(ids)), streams))
    out = (await unless_disconnected(request, collect(streams)))[0]
    choices = []
    for c in out.outputs:
        choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": chat_logprobs(state, c.token_ids, c.logprobs or [], top_k) if req.logprobs
                        else None,
                        "finish_reason": finish_reason(c.finish_reason), "stop_reason": c.stop_reason})
    body = {"id": base_id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "system_fingerprint": None,
            "usage": usage(len(ids), sum(len(c.token_ids) for c in out.outputs))}
    return JSONResponse(body)


async def _stream(state: ServerState, req: ChatCompletionRequest, model: str, base_id: str, created: int,
                  streams, prompt_tokens: int) -> AsyncIterator[bytes]:
    generated = 0
    top_k = req.top_logprobs or 0
    continuous = req.include_usage and bool(req.stream_options and req.stream_options.continuous_usage_stats)

    def chunk(choices: list[dict[str, Any]]) -> bytes:
        d = {"id": base_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices}
        if continuous:
            d["usage"] = usage(prompt_tokens, generated)
        return sse(d)

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for i in range(req.n)])
    gen = merged(streams)
    try:
        async for _, out in gen:
            choices = []
            for c in out.outputs:
                if not c.text_delta and not c.token_ids_delta and not c.finish_reason:
                    continue
                generated += len(c.token_ids_delta)
                delta = {"content": c.text_delta} if c.text_delta or not c.finish_reason else {}
                lp = chat_logprobs(state, c.token_ids_delta, c.logprobs_delta or [], top_k) if req.logprobs \
                    else None
                choices.append({"index": c.index, "delta": delta, "logprobs": lp,
                                "finish_reason": finish_reason(c.finish_reason), "stop_reason": c.stop_reason})
            if choices:
                yield chunk(choices)
    finally:
        await gen.aclose()
    if req.include_usage:
        yield sse({"id": base_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": usage(prompt_tokens, generated)})
    yield SSE_DONE
