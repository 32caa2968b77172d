"""`shardserve serve`: the flags of the OpenAI-compatible server (engine flags + server flags) and its start-up."""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace

EXAMPLES = """examples:
  shardserve serve                                   # built-in SmolLM2-135M-Instruct on 127.0.0.1:8000
  shardserve serve --model DIR -tp 2 --port 8080 --api-key secret
  shardserve serve --model DIR -dp 2 --max-waiting-requests 64 --stats-interval 5
then:  curl localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{"prompt": "Hi", "max_tokens": 8}'
"""


def add_serve_parser(sub) -> argparse.ArgumentParser:
    from shardserve.engine.args import EngineArgs
    from shardserve.engine.core_client import HEARTBEAT_TIMEOUT_S
    from shardserve.entrypoints.router import MAX_MIGRATIONS
    p = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible HTTP API",
                       description="Serve a model over HTTP with the OpenAI API (/v1/completions, "
                                   "/v1/chat/completions, /v1/models), Prometheus /metrics and /health. With -dp N, "
                                   "N engine replicas run behind a load-aware router.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health and /metrics "
                        "(or set SHARDSERVE_API_KEY, which keeps the key out of the process list)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients send in 'model' (default: the --model value, or the built-in name)")
    g.add_argument("--max-waiting-requests", type=int, default=None,
                   help="answer 429 while this many requests wait for their first token (default: no limit)")
    g.add_argument("--stats-interval", type=float, default=10.0,
                   help="seconds between stats log lines (throughput, queue, KV usage); 0 = off")
    g.add_argument("--shutdown-grace-s", type=float, default=30.0,
                   help="on SIGTERM or SIGINT, stop taking requests (503, /health 'draining') and give the ones in "
                        "flight, streams included, this many seconds to finish before stopping the engines and "
                        "exiting 0; a second SIGTERM/SIGINT stops at once (requests still running end with an "
                        "error) (default 30)")
    g.add_argument("--engine-heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT_S,
                   help="seconds without a heartbeat (a thread of each core sends one every 0.5 s, however long its "
                        "step) after which a replica is taken for stalled: unhealthy at once, killed and restarted")
    g.add_argument("--max-migrations", type=int, default=MAX_MIGRATIONS,
                   help="when a replica (-dp) dies or stalls, each of its requests continues on a healthy replica "
                        "(the prompt and the tokens already sent are prefilled there; the client sees no error and "
                        "no repeated or missing text); this many moves per request at most, 0 = off: its requests "
                        f"fail with an error (default {MAX_MIGRATIONS})")
    g.add_argument("--max-request-body-bytes", default="16MiB",
                   help="largest request body accepted, e.g. 16MiB or 1000000; larger ones get 413 before they are "
                        "parsed (default 16MiB)")
    g.add_argument("--max-prompts-per-request", type=int, default=256,
                   help="most prompts one /v1/completions request may carry (default 256)")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="render chat templates sent in requests (chat_template_kwargs.chat_template); they run in a "
                        "jinja2 sandbox with time and size limits, but a template is code: off by default (400)")
    g.add_argument("--plan", choices=["auto", "none"], default="none",
                   help="auto: pick tp/pp/dp/ep with the planner for the GPUs found (and order them so TP groups "
                        "are NVLink neighbours); none: use the layout flags as given")
    g.add_argument("--engine-threads", type=int, default=None,
                   help="torch threads of each engine-core process when tp × pp = 1 (default: the CPUs but one, "
                        "shared out over the replicas; the one is left to the API process)")
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run_serve)
    return p


def resolve_api_key(flag: str | None, env: str | None) -> str | None:
    """The API key from --api-key, else SHARDSERVE_API_KEY; an empty (or blank) one is refused, since taking it for
    "no key" would silently turn authentication off."""
    for name, value in (("--api-key", flag), ("SHARDSERVE_API_KEY", env)):
        if value is not None:
            if not value.strip():
                raise ValueError(f"{name} is empty, which would turn authentication off; give a non-empty key, or "
                                 f"leave {name} out to serve without one")
            return value
    return None


def run_serve(args: argparse.Namespace) -> int:
    from shardserve.engine.args import EngineArgs
    from shardserve.engine.llm_engine import load_tokenizer
    from shardserve.entrypoints.openai.api_server import run_server
    from shardserve.entrypoints.openai.serving import ServerState
    from shardserve.entrypoints.router import Router
    from shardserve.metrics import ServerMetrics
    from shardserve.models.builtin import BUILTIN_SERVED_NAME

    if args.max_waiting_requests is not None and args.max_waiting_requests < 0:
        raise ValueError(f"--max-waiting-requests must be >= 0, got {args.max_waiting_requests}")
    if not args.shutdown_grace_s >= 0:  # (also refuses nan)
        raise ValueError(f"--shutdown-grace-s must be >= 0, got {args.shutdown_grace_s}")
    api_key = resolve_api_key(args.api_key, os.environ.get("SHARDSERVE_API_KEY"))
    from shardserve.config import parse_size
    from shardserve.entrypoints.openai.request_checks import RequestLimits
    limits = RequestLimits(max_body_bytes=int(parse_size(args.max_request_body_bytes) or 0),
                           max_prompts=args.max_prompts_per_request,
                           trust_request_chat_template=args.trust_request_chat_template)
    eargs = EngineArgs.from_cli(args)
    model = eargs.resolve_model(progress=True)
    if args.plan == "auto":
        from shardserve.config import ModelConfig
        from shardserve.planner.local import apply_auto_plan
        hf_config = ModelConfig.from_path(model, eargs.dtype, eargs.max_model_len, eargs.tokenizer).hf_config
        for line in apply_auto_plan(eargs, hf_config):  # config.json, or a GGUF file's metadata
            print(line)
    # validate the layout and resolve max_model_len here, before any process starts (ConfigError → exit 2)
    cfg = replace(eargs, model=model, data_parallel_size=1).create_config(progress=False)
    if eargs.skip_tokenizer_init:
        raise ValueError("--skip-tokenizer-init: the server tokenizes prompts and renders chat templates, so it needs "
                         "a tokenizer; pass one with --tokenizer DIR (token-id-only use: the offline LLM API)")
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    names = args.served_model_name or [eargs.model or BUILTIN_SERVED_NAME]
    metrics = ServerMetrics(names[0])
    if args.engine_threads is not None and args.engine_threads < 1:
        raise ValueError(f"--engine-threads must be >= 1, got {args.engine_threads}")
    if args.max_migrations < 0:
        raise ValueError(f"--max-migrations must be >= 0 (0 turns migration off), got {args.max_migrations}")
    router = Router(eargs, model, cfg.model.max_model_len, metrics, args.max_waiting_requests,
                    args.engine_heartbeat_timeout, threads=args.engine_threads, max_migrations=args.max_migrations)
    state = ServerState(router, tokenizer, names, model, cfg.model.max_model_len, metrics,
                        api_key=api_key, limits=limits)
    logging.getLogger("shardserve.stats").setLevel(logging.INFO)
    log_level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return run_server(state, args.host, args.port, args.stats_interval, str(log_level),
                      shutdown_grace_s=args.shutdown_grace_s)
