"""What the completion and chat handlers share: the server's state, routing a request's prompts to the engine,
merging their streams, aborting on client disconnect, SSE framing, logprob formatting and engine-error mapping."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import StreamingResponse

from shardserve.engine.request_stream import EngineUnavailable, RequestRejected, RequestStream
from shardserve.entrypoints.openai.protocol import APIError, random_id
from shardserve.entrypoints.openai.request_checks import RequestLimits
from shardserve.entrypoints.router import QueueFull, Router
from shardserve.outputs import RequestOutput
from shardserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from shardserve.metrics import ServerMetrics

logger = logging.getLogger(__name__)
# text work above this many characters (tokenizing, chat templates) runs in a worker thread, not the event loop
OFFLOAD_CHARS = 8192


@dataclass
class ServerState:
    router: Router
    tokenizer: PreTrainedTokenizerBase
    model_names: list[str]
    model_path: str
    max_model_len: int
    metrics: ServerMetrics
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    loading_error: str | None = None
    limits: RequestLimits = field(default_factory=RequestLimits)
    # graceful stop (graceful_stop.GracefulStop): set by the first SIGTERM/SIGINT; from then on new generation
    # requests get 503 and /health says "draining", while the ones counted in `active_requests` finish
    draining: bool = False
    active_requests: int = 0  # generation requests (completions, chat) whose HTTP response is not done yet
    _key_digest: bytes | None = None
    _token_text: dict[int, str] = field(default_factory=dict)
    _max_token_chars: int | None = None

    def __post_init__(self) -> None:
        if self.api_key is not None:
            if not self.api_key.strip():
                raise ValueError("the API key is empty: pass a non-empty --api-key (or SHARDSERVE_API_KEY), or none "
                                 "at all to serve without authentication")
            self._key_digest = hashlib.sha256(self.api_key.encode()).digest()

    @property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry in characters (an upper bound on the characters one token can cover)."""
        if self._max_token_chars is None:
            try:
                vocab = self.tokenizer.get_vocab()
                self._max_token_chars = max((len(t) for t in vocab), default=64) or 64
            except Exception:  # noqa: BLE001 - a tokenizer without get_vocab: a generous bound
                self._max_token_chars = 256
        return self._max_token_chars

    def check_text_length(self, n_chars: int, param: str) -> None:
        """Refuse, before tokenizing it, a text that cannot fit the context whatever it encodes to (more characters
        than max_model_len tokens of the longest vocabulary entry could cover, with 2x slack for normalizers)."""
        bound = self.max_model_len * (2 * self.max_token_chars + 16)
        if n_chars > bound:
            raise APIError(400, f"{param} is {n_chars} characters, far more than this model's context length of "
                                f"{self.max_model_len} tokens can hold", param=param, code="context_length_exceeded")

    def check_accepting(self) -> None:
        """Refuse a new generation request while the server drains before stopping (503, code
        server_shutting_down); a request already admitted runs on."""
        if self.draining:
            raise APIError(503, "the server is shutting down and accepts no new requests; retry against another "
                                "instance or once it has restarted", code="server_shutting_down")

    @property
    def in_flight(self) -> int:
        """Work the drain waits for: generation requests whose response is not done, or (should one not be
        counted there) requests the engine replicas still run."""
        return max(self.active_requests, sum(r.num_in_flight for r in self.router.replicas))

    def check_api_key(self, authorization: str | None) -> None:
        """Constant-time check of `Authorization: Bearer KEY` (both sides hashed, so lengths leak nothing)."""
        if self._key_digest is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        got = hashlib.sha256(token.strip().encode()).digest()
        if not (hmac.compare_digest(got, self._key_digest) and scheme.lower() == "bearer"):
            raise APIError(401, "invalid or missing API key; send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(self, name: str | None) -> str:
        if name is None:
            return self.model_names[0]
        if name not in self.model_names:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                                f"{', '.join(repr(n) for n in self.model_names)}", param="model",
                           code="model_not_found")
        return name

    def token_text(self, token_id: int) -> str:
        """The text of one token as OpenAI shows it in logprobs (cached; the vocabulary is bounded)."""
        t = self._token_text.get(token_id)
        if t is None:
            t = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return t


def engine_error(e: Exception) -> APIError:
    """Map an engine/router exception to the error the client sees."""
    if isinstance(e, RequestRejected):
        msg = str(e)
        param = "max_tokens" if "max_tokens" in msg else ("prompt" if "prompt" in msg else None)
        code = "context_length_exceeded" if "context length" in msg else None
        return APIError(400, msg, param=param, code=code)
    if isinstance(e, QueueFull):
        return APIError(429, str(e), code="queue_full")
    if isinstance(e, EngineUnavailable):
        return APIError(503, str(e), code="engine_unavailable")
    return internal_error(e)


def internal_error(e: BaseException) -> APIError:
    """A bug, not bad input: the traceback goes to the log under a request id, the client gets only the id."""
    rid = random_id("err")
    logger.error("internal error %s", rid, exc_info=(type(e), e, e.__traceback__))
    return APIError(500, f"internal server error (id {rid}); the server log has the details", code="internal_error")


async def open_streams(state: ServerState, base_id: str, prompts: list[list[int]], params: SamplingParams,
                       texts: list[str | None]) -> list[RequestStream]:
    """Add one engine request per prompt (concurrently); all or none: on any error the others are aborted."""
    if state.router.num_healthy == 0:
        if state.loading_error:
            raise APIError(503, f"the engine failed to start: {state.loading_error}", code="engine_unavailable")
    max_n = int(state.router.core_args.get("max_num_seqs") or params.n)
    if params.n > max_n:
        raise APIError(400, f"n must be <= {max_n} (the server's --max-num-seqs), got {params.n}", param="n")
    arrival = time.monotonic()
    results = await asyncio.gather(*(state.router.add_request(f"{base_id}-{i}", ids, params, texts[i], arrival)
                                     for i, ids in enumerate(prompts)), return_exceptions=True)
    streams = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for s in streams:
            s.close()
        if isinstance(errors[0], (RequestRejected, QueueFull, EngineUnavailable)):
            raise engine_error(errors[0]) from None
        raise errors[0]
    return streams


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams as they come; raises the first stream error."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def collect(streams: list[RequestStream]) -> list[RequestOutput]:
    """The final output of every stream (non-streaming requests)."""
    finals: list[RequestOutput | None] = [None] * len(streams)
    gen = merged(streams)
    try:
        async for i, out in gen:
            finals[i] = out
    except EngineUnavailable as e:
        raise engine_error(e) from None
    finally:
        await gen.aclose()
        for s in streams:
            s.close()
    return finals  # type: ignore[return-value]


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, coro):
    """Run `coro`; if the client disconnects first, cancel it (its finally blocks abort the engine requests)."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work in done:
        return work.result()
    work.cancel()
    try:
        await work
    except (asyncio.CancelledError, Exception):
        pass
    raise ClientGone()


def sse(data: dict[str, Any] | str) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {body}\n\n".encode()


SSE_DONE = sse("[DONE]")


class SSEResponse(StreamingResponse):
    """Server-sent events whose body generator is always closed (its finally aborts engine requests), also when
    the client goes away mid-stream."""

    def __init__(self, content: AsyncIterator[bytes], **kw: Any) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, **kw)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def guard_stream(body: AsyncIterator[bytes], streams: list[RequestStream]) -> AsyncIterator[bytes]:
    """Wrap an SSE body: engine errors become an SSE error event then [DONE]; streams are closed at the end."""
    try:
        async for chunk in body:
            yield chunk
    except (EngineUnavailable, APIError) as e:
        err = e if isinstance(e, APIError) else engine_error(e)
        yield sse(err.body())
        yield SSE_DONE
    except Exception as e:  # noqa: BLE001 - a bug mid-stream: an error event with an id, never a dropped stream
        yield sse(internal_error(e).body())
        yield SSE_DONE
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()
        for s in streams:
            s.close()


# --- logprobs --------------------------------------------------------------------------------------------------
def completion_logprobs(state: ServerState, token_ids: list[int], entries: list[dict | None],
                        text_offset: int) -> tuple[dict[str, list], int]:
    """Legacy completions logprobs {tokens, token_logprobs, top_logprobs, text_offset}; returns the next offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, e in zip(token_ids, entries):
        t = state.token_text(tid)
        tokens.append(t)
        offsets.append(text_offset)
        text_offset += len(t)
        if e is None:  # the first prompt token has no logprob
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(float(e["logprob"]))
        top = {state.token_text(x): float(lp) for x, lp in zip(e.get("top_token_ids") or [], e.get("top_logprobs") or [])}
        top.setdefault(t, float(e["logprob"]))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, text_offset


def chat_logprobs(state: ServerState, token_ids: list[int], entries: list[dict], top_k: int) -> dict[str, list]:
    """Chat logprobs {content: [{token, logprob, bytes, top_logprobs: [...]}]}."""
    def item(tid: int, lp: float) -> dict[str, Any]:
        t = state.token_text(tid)
        return {"token": t, "logprob": float(lp), "bytes": list(t.encode("utf-8"))}
    content = []
    for tid, e in zip(token_ids, entries):
        d = item(tid, e["logprob"])
        d["top_logprobs"] = [item(x, lp) for x, lp in
                             zip((e.get("top_token_ids") or [])[:top_k], (e.get("top_logprobs") or [])[:top_k])]
        content.append(d)
    return {"content": content}
