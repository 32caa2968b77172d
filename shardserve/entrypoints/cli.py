"""The `shardserve` command: generate, chat, serve, bench, plan, make-tiny-model, make-random-model."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from shardserve.config import ConfigError

EPILOG = """examples:
  shardserve generate --chat --prompt "What is the capital of France?"   # built-in SmolLM2-135M-Instruct
  shardserve chat                                               # interactive, streaming
  shardserve generate --model DIR -tp 2 --prompt "Hi" --temperature 0.8 --seed 1
  shardserve make-tiny-model ./tiny                             # the random tiny test model
  shardserve bench throughput --compare-hf                      # engine vs transformers tokens/s
"""


def _add_generate(sub) -> None:
    from shardserve.engine.args import EngineArgs
    p = sub.add_parser("generate", help="generate text for one or more prompts (offline)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Run the engine offline on prompts given on the command line.")
    p.add_argument("--prompt", action="append", required=True,
                   help="a prompt; repeat the flag for a batch of prompts")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request seed for reproducible sampling")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from shardserve.engine.args import EngineArgs
    from shardserve.entrypoints.llm import LLM
    from shardserve.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sampling_seed, ignore_eos=args.ignore_eos)
    eargs = EngineArgs.from_cli(args)
    llm = LLM(**vars(eargs))
    try:
        if args.chat:
            outs = [llm.chat([{"role": "user", "content": p}], params, use_tqdm=False)[0] for p in args.prompt]
        else:
            outs = llm.generate(args.prompt, params)
        for prompt, out in zip(args.prompt, outs):
            o = out.outputs[0]
            if args.json:
                print(json.dumps({"prompt": prompt, "text": o.text, "token_ids": o.token_ids,
                                  "finish_reason": o.finish_reason}))
            else:
                print(f"--- prompt: {prompt!r}\n{o.text}\n--- [{len(o.token_ids)} tokens, {o.finish_reason}]")
    finally:
        llm.shutdown()
    return 0


def _add_make_tiny(sub) -> None:
    p = sub.add_parser("make-tiny-model", help="write the built-in tiny Llama (random weights) to DIR",
                       description="Write the built-in ~32M-parameter Llama (deterministic RANDOM weights, a real "
                                   "BPE tokenizer) as a normal Hugging Face directory.")
    p.add_argument("dir", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="weight seed (0 = the built-in model)")
    p.set_defaults(func=_run_make_tiny)


def _run_make_tiny(args: argparse.Namespace) -> int:
    from shardserve.models.tiny import write_tiny_model
    path = write_tiny_model(args.dir, seed=args.seed, progress=True)
    print(f"wrote {path}")
    return 0


def _add_make_random(sub) -> None:
    p = sub.add_parser("make-random-model", help="write a full-size model of a preset's shape with random weights",
                       description="Write a Hugging Face directory with the shape of a planner preset (e.g. "
                                   "llama-3-8b, qwen3-0.6b) and seeded RANDOM weights, for speed measurements "
                                   "where nothing can be downloaded. Presets: `shardserve plan --help`.")
    p.add_argument("dir", help="output directory")
    p.add_argument("--like", required=True, help="preset name, e.g. llama-3.1-8b, qwen3-0.6b, mixtral-8x7b")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    p.add_argument("--seed", type=int, default=0, help="weight seed")
    p.add_argument("--shard-size", default="2GiB", help="bytes per safetensors file")
    p.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                   help="change a config field, e.g. --override num_hidden_layers=2 (repeatable)")
    p.set_defaults(func=_run_make_random)


def _run_make_random(args: argparse.Namespace) -> int:
    from shardserve.models.random_model import write_random_model
    overrides = {}
    for item in args.override:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--override {item!r}: write KEY=VALUE, e.g. num_hidden_layers=2")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    path = write_random_model(args.like, args.dir, args.dtype, args.seed, overrides, args.shard_size)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardserve", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Serve and run LLMs across many devices (TP, PP, DP, EP).")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub)
    from shardserve.entrypoints.chat_cli import add_chat_parser
    add_chat_parser(sub)
    _add_make_tiny(sub)
    _add_make_random(sub)
    from shardserve.bench.cli import add_bench_parser
    add_bench_parser(sub)
    from shardserve.entrypoints.openai.cli import add_serve_parser
    from shardserve.planner.cli import add_plan_parser
    add_serve_parser(sub)
    add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
