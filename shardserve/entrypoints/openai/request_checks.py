"""Limits and checks that run on a request before (or instead of) the expensive work: the body size while it is read,
the number and size of prompts before pydantic sees them, invalid Unicode anywhere, and chat messages as the OpenAI
API defines them. Everything here raises `APIError` 400/413 that names the limit or the field."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from starlette.requests import Request

from shardserve.entrypoints.openai.protocol import APIError, load_json, validate_data

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PROMPTS = 256
MAX_REQUEST_TEMPLATE_CHARS = 64 * 1024
# a body over the limit is still read (and thrown away) up to this many bytes, so that the client, which is still
# sending it, gets the 413 instead of a reset connection; beyond it the connection is simply closed
_DRAIN_LIMIT = 256 * 1024 * 1024

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_prompts: int = DEFAULT_MAX_PROMPTS
    trust_request_chat_template: bool = False
    template_time_limit_s: float = 5.0
    template_max_chars: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ValueError(f"--max-request-body-bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_prompts < 1:
            raise ValueError(f"--max-prompts-per-request must be >= 1, got {self.max_prompts}")


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {limit} bytes "
                         "(--max-request-body-bytes)", code="request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as Content-Length or the bytes received so far pass `limit` (nothing over the
    limit is kept in memory)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise APIError(400, "the Content-Length header is not a number") from None
        if size > limit:
            if size <= _DRAIN_LIMIT:
                await _drain(request)
            raise _too_large(limit)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            chunks.clear()
            await _drain(request, total)
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request: Request, seen: int = 0) -> None:
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > _DRAIN_LIMIT:
                return
    except Exception:  # noqa: BLE001 - a client gone while we discard its body changes nothing
        return


async def parse_request(request: Request, model: type, limits: RequestLimits, max_model_len: int | None) -> Any:
    """Read the body within the size limit, parse the JSON, refuse invalid Unicode and oversized prompts, then
    validate it into `model` (all 400/413 naming the field or the limit)."""
    raw = await read_body(request, limits.max_body_bytes)
    data = load_json(raw)
    check_unicode(raw, data)
    check_prompt_shape(data, limits, max_model_len)
    return validate_data(data, model)


# --- before pydantic -------------------------------------------------------------------------------------------
def check_prompt_shape(data: dict[str, Any], limits: RequestLimits, max_model_len: int | None) -> None:
    """Cheap checks of the raw `prompt` field before pydantic validates (and maybe reports every element of) it:
    at most `max_prompts` prompts, and a token-id list no longer than the context."""
    p = data.get("prompt")
    if not isinstance(p, list) or not p:
        return
    if isinstance(p[0], int) and not isinstance(p[0], bool):
        if max_model_len is not None and len(p) > max_model_len:
            raise APIError(400, f"the prompt is {len(p)} tokens, more than this model's context length of "
                                f"{max_model_len} tokens", param="prompt", code="context_length_exceeded")
        return
    if len(p) > limits.max_prompts:
        raise APIError(400, f"prompt has {len(p)} prompts, more than the server's limit of {limits.max_prompts} "
                            "per request (--max-prompts-per-request)", param="prompt")
    if max_model_len is not None:
        for i, q in enumerate(p):
            if isinstance(q, list) and len(q) > max_model_len:
                raise APIError(400, f"prompt {i} is {len(q)} tokens, more than this model's context length of "
                                    f"{max_model_len} tokens", param="prompt", code="context_length_exceeded")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def check_unicode(raw: bytes, data: Any) -> None:
    """A lone UTF-16 surrogate (JSON `"\\ud800"` without its pair) anywhere → 400 naming the field. Raw UTF-8
    cannot carry one (json.loads refuses it), so bodies without a `\\uD8..`-`\\uDF..` escape are skipped at C speed."""
    if not _SURROGATE_ESCAPE.search(raw):
        return
    path = _find_surrogate(data, [])
    if path is not None:
        field = ".".join(str(x) for x in path) or None
        raise APIError(400, f"{field or 'the request body'}: the text contains invalid Unicode (a lone surrogate "
                            "code point such as \\ud800); send valid UTF-8 / UTF-16 text", param=field)


def _bad(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _find_surrogate(x: Any, path: list) -> list | None:
    if isinstance(x, str):
        return path if _bad(x) else None
    if isinstance(x, dict):
        for k, v in x.items():
            if _bad(k):
                return path + [k.encode("utf-8", "replace").decode()]
            found = _find_surrogate(v, path + [k])
            if found is not None:
                return found
    elif isinstance(x, list):
        for i, v in enumerate(x):
            if isinstance(v, (str, dict, list)):
                found = _find_surrogate(v, path + [i])
                if found is not None:
                    return found
    return None


# --- chat messages ---------------------------------------------------------------------------------------------
def check_messages(messages: Sequence[Any], continue_final_message: bool = False) -> None:
    """Roles and content as the OpenAI API defines them: at least one message; role one of ROLES; system,
    developer, user and tool messages need content (tool also tool_call_id); an assistant message needs content
    (this server has no tool calls); and a conversation of assistant turns only has nothing to answer unless the
    last one is to be continued (`continue_final_message`)."""
    if not messages:
        raise APIError(400, "messages must contain at least one message", param="messages")
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if m.role not in ROLES:
            raise APIError(400, f"{where}.role: unknown role {m.role!r}; use one of {', '.join(ROLES)}",
                           param=f"{where}.role")
        content = m.content
        empty_parts = isinstance(content, list) and not content
        if content is None or empty_parts:
            raise APIError(400, f"{where}.content: a {m.role} message needs content", param=f"{where}.content")
        if m.role == "tool" and not isinstance(getattr(m, "tool_call_id", None), str):
            raise APIError(400, f"{where}.tool_call_id: a tool message needs tool_call_id",
                           param=f"{where}.tool_call_id")
    if all(m.role == "assistant" for m in messages) and not continue_final_message:
        raise APIError(400, "messages: the conversation has only assistant messages, so there is nothing to answer; "
                            "add a user message (or set continue_final_message to continue the last one)",
                       param="messages")


def check_template_kwargs(kwargs: dict[str, Any] | None, limits: RequestLimits) -> str | None:
    """The request's own chat template (`chat_template_kwargs.chat_template`), or None; refused unless the operator
    trusts request templates (`--trust-request-chat-template`)."""
    if not kwargs or "chat_template" not in kwargs:
        return None
    template = kwargs["chat_template"]
    if not limits.trust_request_chat_template:
        raise APIError(400, "chat_template_kwargs.chat_template: this server does not render chat templates sent "
                            "in requests (the operator can allow them with --trust-request-chat-template)",
                       param="chat_template_kwargs.chat_template")
    if not isinstance(template, str) or not template:
        raise APIError(400, "chat_template_kwargs.chat_template must be a non-empty string",
                       param="chat_template_kwargs.chat_template")
    if len(template) > MAX_REQUEST_TEMPLATE_CHARS:
        raise APIError(400, f"chat_template_kwargs.chat_template is {len(template)} characters, more than the "
                            f"limit of {MAX_REQUEST_TEMPLATE_CHARS}", param="chat_template_kwargs.chat_template")
    return template
