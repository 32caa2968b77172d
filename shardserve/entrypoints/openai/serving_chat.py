"""POST /v1/chat/completions: messages through the tokenizer's chat template → one engine request → OpenAI chat
completion objects, whole or as server-sent deltas."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shardserve.entrypoints.openai import protocol
from shardserve.entrypoints.openai.chat_template import TemplateLimitError, render_request_template
from shardserve.entrypoints.openai.protocol import APIError, ChatCompletionRequest, ChatMessage, finish_reason, usage
from shardserve.entrypoints.openai.request_checks import check_messages, check_template_kwargs, parse_request
from shardserve.entrypoints.openai.serving import (OFFLOAD_CHARS, SSE_DONE, ServerState, SSEResponse, chat_logprobs,
                                                   collect, guard_stream, merged, open_streams, sse,
                                                   unless_disconnected)


def render_chat(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool = True,
                continue_final_message: bool = False, kwargs: dict[str, Any] | None = None,
                template: str | None = None) -> tuple[str, list[int]]:
    """The templated prompt and its token ids (add_special_tokens=False: the template already has BOS). `template`:
    the request's own chat template (already allowed by `check_template_kwargs`), rendered in the sandbox. Blocking:
    `prepare_chat` runs it in a worker thread when the input is large."""
    msgs = [m.as_template_dict() for m in messages]
    kw = {k: v for k, v in (kwargs or {}).items() if k != "chat_template"}
    add_gen = add_generation_prompt and not continue_final_message
    try:
        if template is not None:
            tok_vars = {k: v for k, v in (getattr(state.tokenizer, "special_tokens_map", None) or {}).items()
                        if isinstance(v, str)}
            text = render_request_template(template, msgs, add_gen, continue_final_message, {**tok_vars, **kw},
                                           state.limits.template_time_limit_s, state.limits.template_max_chars)
        else:
            text = state.tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=add_gen, continue_final_message=continue_final_message,
                **kw)
    except TemplateLimitError as e:
        raise APIError(400, f"chat_template_kwargs.chat_template: {e}",
                       param="chat_template_kwargs.chat_template") from None
    except Exception as e:  # jinja errors, bad kwargs: the client's messages did not fit the template
        raise APIError(400, f"the chat template could not render these messages: {str(e)[:500]}",
                       param="messages") from None
    if not isinstance(text, str):
        raise APIError(400, "the chat template did not render to text (check chat_template_kwargs)", param="messages")
    state.check_text_length(len(text), "messages")
    return text, state.tokenizer.encode(text, add_special_tokens=False)


async def prepare_chat(state: ServerState, req: Any, add_generation_prompt: bool,
                       continue_final_message: bool = False,
                       kwargs: dict[str, Any] | None = None) -> tuple[str, list[int]]:
    """Validate the messages (roles, content, the request's own template) and render them; large inputs and
    request templates run in a worker thread so that the event loop (and /health) stay responsive."""
    check_messages(req.messages, continue_final_message)
    kwargs = dict(kwargs or {})
    top = (req.model_extra or {}).get("chat_template")
    if top is not None:
        kwargs.setdefault("chat_template", top)
    template = check_template_kwargs(kwargs, state.limits)
    chars = sum(len(m.content) if isinstance(m.content, str) else sum(len(p.text or "") for p in m.content or [])
                for m in req.messages)
    state.check_text_length(chars, "messages")
    args = (state, req.messages, add_generation_prompt, continue_final_message, kwargs, template)
    if template is not None or chars > OFFLOAD_CHARS:
        return await asyncio.to_thread(render_chat, *args)
    return render_chat(*args)


async def create_chat_completion(state: ServerState, request: Request) -> Response:
    req = await parse_request(request, ChatCompletionRequest, state.limits, state.max_model_len)
    model = state.check_model(req.model)
    params = req.sampling_params()
    text, ids = await prepare_chat(state, req, req.add_generation_prompt, req.continue_final_message,
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
