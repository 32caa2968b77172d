"""Where an offline throughput run's time goes: the `bench throughput` workload (same defaults and seed) through
the in-process engine, with wall time summed by step kind (steps with prompt tokens vs pure-decode steps) and, with
--layers, by decoder-layer module (prefill steps; a pure-decode step on CPU is one C call and is not split).

    python tools/profile_steps.py --dtype bfloat16 [--layers] [--num-prompts 64]
"""
from __future__ import annotations

import argparse
import collections
import time

import torch

from shardserve import LLM, SamplingParams
from shardserve.bench.workload import parse_range, random_workload


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", default="32:512")
    p.add_argument("--output-len", default="16:256")
    p.add_argument("--layers", action="store_true", help="also time each module of the decoder layers")
    args = p.parse_args()
    llm = LLM(dtype=args.dtype, device="cpu", use_tqdm_on_load=False)
    eng = llm.engine
    runner = eng.executor.worker.runner
    tok = llm.get_tokenizer()
    wl = random_workload(args.num_prompts, parse_range(args.input_len), parse_range(args.output_len),
                         min(len(tok), eng.cfg.model.vocab_size), 0, avoid=set(tok.all_special_ids))
    secs: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()

    def timed(obj, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                secs[key] += time.perf_counter() - t
                calls[key] += 1
        setattr(obj, name, wrapper)

    kind = {}
    schedule = eng.scheduler.schedule

    def schedule_and_classify(*a, **k):
        out = schedule(*a, **k)
        tokens = sum(len(s.token_ids) for s in out.seqs)
        kind["now"] = "steps with prompt tokens" if tokens > len(out.seqs) else "pure-decode steps"
        return out
    eng.scheduler.schedule = schedule_and_classify
    step = eng.step

    def classified_step():
        t = time.perf_counter()
        r = step()
        key = kind.get("now", "empty steps")
        secs[key] += time.perf_counter() - t
        calls[key] += 1
        return r
    eng.step = classified_step
    if args.layers:
        for layer in runner.model.model.layers:
            a = layer.self_attn
            for mod, key in ((a.qkv_proj, "qkv_proj"), (a.rotary_emb, "rotary"), (a.attn, "attention"),
                             (a.o_proj, "o_proj"), (layer.mlp.gate_up_proj, "gate_up_proj"),
                             (layer.mlp.act_fn, "silu_and_mul"), (layer.mlp.down_proj, "down_proj"),
                             (layer.input_layernorm, "input_layernorm"),
                             (layer.post_attention_layernorm, "post_attention_layernorm")):
                timed(mod, "forward", "  layer " + key)
        timed(runner, "sample", "  logits + sampling")
    params = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0) for o in wl.output_lens]
    llm.generate(prompt_token_ids=wl.prompts[:2], sampling_params=params[:2], use_tqdm=False)  # warm-up
    secs.clear()
    calls.clear()
    t0 = time.perf_counter()
    llm.generate(prompt_token_ids=wl.prompts, sampling_params=params, use_tqdm=False)
    wall = time.perf_counter() - t0
    print(f"{wall:.2f} s, {wl.num_output_tokens / wall:.1f} output tok/s, {wl.num_prompt_tokens} prompt tokens, "
          f"{torch.get_num_threads()} threads")
    for key, v in sorted(secs.items(), key=lambda kv: -kv[1]):
        print(f"{key:34s} {v:8.2f} s  {calls[key]:6d} calls")
    llm.shutdown()


if __name__ == "__main__":
    main()
