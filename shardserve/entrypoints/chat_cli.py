"""`shardserve chat`: an interactive chat in the terminal with the model (the built-in one by default), the reply
streamed token by token as it is generated. `/reset` forgets the conversation, `/exit` (or Ctrl-D) leaves."""
from __future__ import annotations

import argparse
import sys


def add_chat_parser(sub) -> None:
    from shardserve.engine.args import EngineArgs
    p = sub.add_parser("chat", help="chat with the model in the terminal (streaming)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Interactive chat: type a message, read the reply as it streams. The model's chat "
                                   "template formats the conversation; /reset starts over, /exit or Ctrl-D quits.")
    p.add_argument("--system", default=None, help="a system message at the start of the conversation")
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--sampling-seed", type=int, default=None, help="seed for reproducible sampling")
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace, stdin=None, stdout=None) -> int:
    from shardserve.engine.args import EngineArgs
    from shardserve.entrypoints.llm import LLM
    from shardserve.sampling_params import SamplingParams
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.sampling_seed)
    llm = LLM(**vars(EngineArgs.from_cli(args)))
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    interactive = stdin.isatty()
    try:
        if interactive:
            print("chatting with the model: /reset starts over, /exit or Ctrl-D quits", file=stdout)
        while True:
            if interactive:
                print("you> ", end="", file=stdout, flush=True)
            line = stdin.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text == "/exit":
                break
            if text == "/reset":
                history = list(start)
                continue
            history.append({"role": "user", "content": text})
            print("model> ", end="", file=stdout, flush=True)
            reply = []
            for piece in llm.stream_chat(history, params):
                reply.append(piece)
                print(piece, end="", file=stdout, flush=True)
            print(file=stdout, flush=True)
            history.append({"role": "assistant", "content": "".join(reply)})
    except KeyboardInterrupt:
        print(file=stdout)
    finally:
        llm.shutdown()
    return 0
