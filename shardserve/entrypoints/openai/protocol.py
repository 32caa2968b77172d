"""OpenAI wire types: request models (strict pydantic), their mapping to SamplingParams, and OpenAI-style errors."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shardserve.sampling_params import MAX_LOGPROBS, SamplingParams


class APIError(Exception):
    """An error the client sees as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "internal_error", 503: "service_unavailable_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    # strict: "16" is not an int and 1 is not a bool; unknown fields (user, metadata...) are accepted and ignored
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Request):
    """Fields shared by completions and chat (OpenAI's, then vLLM's extra sampling fields)."""
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # extra sampling fields (vLLM names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = Field(default=None, fail_fast=True)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def _params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
                default_temperature: float = 1.0) -> SamplingParams:
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        kw: dict[str, Any] = dict(
            n=self.n, temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output, ignore_eos=self.ignore_eos,
            max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens)
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            msg = str(e)
            field = msg.split(" ", 1)[0]
            raise APIError(400, msg, param=field if field in kw else None) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    prompt_logprobs: int | None = None

    def sampling_params(self) -> SamplingParams:
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, f"best_of must equal n ({self.n}) on this server, got {self.best_of}",
                           param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", param="logprobs")
        plp = self.prompt_logprobs
        if plp is None and self.echo and self.logprobs is not None:
            plp = self.logprobs  # echo with logprobs shows the prompt tokens' logprobs too
        return self._params(self.max_tokens, self.logprobs, plp)

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (each a string or a list of token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_call_id: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"content parts of type {part.type!r} are not supported; send text parts",
                                   param="messages")
                texts.append(part.text)
            content = "".join(texts)
        d: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name:
            d["name"] = self.name
        return d


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(fail_fast=True)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def sampling_params(self) -> SamplingParams:
        if not self.messages:
            raise APIError(400, "messages must contain at least one message", param="messages")
        if self.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format type 'text' is supported", param="response_format")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                               param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        try:
            return self._params(max_tokens, logprobs)
        except APIError as e:
            if e.param == "max_tokens" and self.max_completion_tokens is not None:
                e.param = "max_completion_tokens"
                e.message = e.message.replace("max_tokens", "max_completion_tokens", 1)
            raise


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, fail_fast=True)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int] = Field(fail_fast=True)


# --- parsing ---------------------------------------------------------------------------------------------------
_UNION_HINTS = {"prompt": "prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                          "token ids",
                "stop": "stop must be a string or a list of strings",
                "content": "content must be a string or a list of content parts"}


def validation_message(err: ValidationError) -> tuple[str, str | None]:
    """A pydantic error as one line that names the field, and the field (OpenAI's `param`)."""
    first = err.errors()[0]
    loc = [str(x) for x in first["loc"]]
    if first["type"] == "missing":
        return f"missing required field: {'.'.join(loc)}", ".".join(loc)
    field_parts = [p for p in loc if not any(c in p for c in "[]") and p not in
                   ("str", "int", "list", "function-after", "none")]
    field = ".".join(field_parts) or None
    for key, hint in _UNION_HINTS.items():
        if field_parts and field_parts[-1] == key and len(loc) > len(field_parts):
            return f"{field}: {hint}", field
    msg = first["msg"]
    if "input" in first and first["type"].endswith("_type"):
        msg += f", got {json.dumps(first['input'])[:60]}"
    return f"{field}: {msg}" if field else msg, field


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def load_json(raw: bytes) -> dict[str, Any]:
    """JSON bytes → a dict, or an APIError 400 (bad JSON, not an object)."""
    try:
        data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float) if raw else None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """JSON bytes → `model`, or an APIError 400 that says what is wrong (bad JSON, missing or mistyped field)."""
    return validate_data(load_json(raw), model)


def validate_data(data: dict[str, Any], model: type[BaseModel]) -> Any:
    """A JSON object → `model`, or an APIError 400 naming the missing or mistyped field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        msg, param = validation_message(e)
        raise APIError(400, msg, param=param) from None


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str | None) -> str | None:
    """Engine finish reasons as OpenAI's: stop | length (abort and error never reach a client as a reason)."""
    return None if reason is None else ("length" if reason == "length" else "stop")


__all__ = ["APIError", "CompletionRequest", "ChatCompletionRequest", "ChatMessage", "TokenizeRequest",
           "DetokenizeRequest", "parse_body", "load_json", "validate_data", "validation_message", "random_id",
           "usage", "finish_reason"]
