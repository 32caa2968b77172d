"""The OpenAI-compatible HTTP server: the FastAPI app (routes, API-key check, OpenAI-style errors), engine start-up
in the background (/health says 503 until a replica serves), the periodic stats log, and running it under uvicorn
with a graceful stop (`GracefulStop`: the first SIGTERM/SIGINT drains, a second one or the end of
--shutdown-grace-s stops at once)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
from contextlib import asynccontextmanager
from typing import Any, Callable, Iterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import shardserve
from shardserve.entrypoints.openai.openapi import install_openapi
from shardserve.entrypoints.openai.protocol import APIError, DetokenizeRequest, TokenizeRequest
from shardserve.entrypoints.openai.request_checks import parse_request
from shardserve.entrypoints.openai.serving import OFFLOAD_CHARS, ClientGone, ServerState, internal_error
from shardserve.entrypoints.openai.serving_chat import create_chat_completion, prepare_chat
from shardserve.entrypoints.openai.serving_completion import create_completion
from shardserve.entrypoints.openai.graceful_stop import CountGenerationRequests, GracefulStop, say
from shardserve.metrics import CONTENT_TYPE_LATEST, StatsLogger

logger = logging.getLogger(__name__)


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def build_app(state: ServerState, stats_interval: float = 10.0,
              on_fatal: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The app; its lifespan starts the engine replicas in the background and stops them on shutdown."""

    async def start_engines() -> None:
        try:
            await state.router.start()
            logger.info("all %d engine replica(s) ready", state.router.num_replicas)
        except Exception as e:  # noqa: BLE001 - reported, then the server stops
            state.loading_error = str(e)
            logger.error("the engine failed to start: %s", e)
            if on_fatal is not None:
                on_fatal(e)

    async def log_stats() -> None:
        stats = StatsLogger(state.metrics, stats_interval)
        while True:
            await asyncio.sleep(stats_interval)
            stats.log()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [asyncio.create_task(start_engines())]
        if stats_interval > 0:
            tasks.append(asyncio.create_task(log_stats()))
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await state.router.shutdown()
            if state.draining:
                say("engine replicas stopped")

    app = FastAPI(title="shardserve", version=shardserve.__version__, lifespan=lifespan,
                  docs_url="/docs", redoc_url=None, openapi_url="/openapi.json",
                  description="OpenAI-compatible API of shardserve (docs/serving.md)")
    app.state.shardserve = state
    app.add_middleware(CountGenerationRequests, state=state)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        return _error_response(APIError(400, f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def client_gone(_: Request, exc: Exception) -> Response:
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def on_internal_error(_: Request, exc: Exception) -> JSONResponse:
        return _error_response(internal_error(exc))

    def authorized(request: Request) -> None:
        state.check_api_key(request.headers.get("authorization"))

    auth = [Depends(authorized)]

    # --- open endpoints ------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        router = state.router
        body: dict[str, Any] = {"replicas": router.status(), "healthy": router.num_healthy}
        if state.draining:  # load balancers: send nothing new here
            return JSONResponse({"status": "draining", "in_flight": state.in_flight, **body}, status_code=503)
        if router.num_healthy:
            return JSONResponse({"status": "ok", **body})
        status = "failed" if state.loading_error else ("loading" if not router.started else "unavailable")
        return JSONResponse({"status": status, "error": state.loading_error, **body}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # --- protected endpoints -------------------------------------------------------------------------------
    @app.get("/version", dependencies=auth)
    async def version() -> dict[str, str]:
        return {"version": shardserve.__version__}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": state.created, "owned_by": "shardserve",
             "root": state.model_path, "parent": None, "max_model_len": state.max_model_len}
            for name in state.model_names]}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        state.check_accepting()
        return await create_completion(state, request)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        state.check_accepting()
        return await create_chat_completion(state, request)

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(request: Request) -> dict[str, Any]:
        req = await parse_request(request, TokenizeRequest, state.limits, state.max_model_len)
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            _, ids = await prepare_chat(state, req, req.add_generation_prompt)
        else:
            state.check_text_length(len(req.prompt), "prompt")

            def encode() -> list[int]:
                return state.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
            ids = await asyncio.to_thread(encode) if len(req.prompt) > OFFLOAD_CHARS else encode()
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(request: Request) -> dict[str, Any]:
        req = await parse_request(request, DetokenizeRequest, state.limits, state.max_model_len)
        state.check_model(req.model)
        if len(req.tokens) > state.max_model_len:
            raise APIError(400, f"tokens has {len(req.tokens)} ids, more than this model's context length of "
                                f"{state.max_model_len}", param="tokens")
        vocab = len(state.tokenizer)
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range [0, {vocab})", param="tokens")
        return {"prompt": state.tokenizer.decode(req.tokens)}

    install_openapi(app)
    return app


def run_server(state: ServerState, host: str, port: int, stats_interval: float = 10.0,
               log_level: str = "warning", shutdown_grace_s: float = 30.0) -> int:
    """Serve until SIGINT/SIGTERM (a graceful stop, `GracefulStop`); returns 0 after a requested stop, 1 if the
    engine failed to start."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with our signal handling: uvicorn's own stops at the first signal (waiting only
        --timeout-graceful-shutdown for responses, then cancelling them) and re-raises the signal at the end, so
        the process died of SIGTERM rather than exiting 0."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.on_signal, sig)
            try:
                yield
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(e: BaseException) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = build_app(state, stats_interval, on_fatal)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=5,
                            access_log=log_level.lower() in ("debug", "info"))
    server = Server(config)
    stop = GracefulStop(state, shutdown_grace_s, server)
    print(f"shardserve: serving {', '.join(state.model_names)} on http://{host}:{port} "
          f"({state.router.num_replicas} engine replica(s) loading; GET /health says 200 when ready)",
          file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        _sweep_shared_memory()
    if failed:
        print(f"error: the engine failed to start: {failed[0]}", file=sys.stderr)
        return 1
    if stop.signals:
        say("stopped")
    return 0


def _sweep_shared_memory() -> None:
    """Unlink the pid-named segments (rings, heartbeat boards, all-reduce) of processes that no longer run, e.g.
    engine cores or ranks killed with their resource trackers."""
    try:
        from shardserve.distributed.message_queue import reap_orphaned_segments
        reap_orphaned_segments()
    except Exception as e:  # noqa: BLE001 - best effort on the way out
        logger.warning("sweeping /dev/shm failed: %s", e)
