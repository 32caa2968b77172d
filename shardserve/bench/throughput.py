"""`shardserve bench throughput`: offline tokens/s of the engine on a seeded random workload, optionally against
transformers `generate` (batched with left padding, as a transformers user would) on the same model and prompts
(--compare-hf), and/or against llama.cpp (--compare-llamacpp FILE.gguf, needs the optional llama-cpp-python: the same
prompt token ids and output lengths, the requests one after another since llama-cpp-python has no batching, the
engine's torch thread count; bench/llamacpp_peer.py)."""
from __future__ import annotations

import argparse
import gc
import json
import platform
import time

import torch
from tqdm import tqdm

from shardserve.bench.workload import Workload, parse_range, random_workload


def add_args(p: argparse.ArgumentParser) -> None:
    from shardserve.engine.args import EngineArgs
    p.add_argument("--num-prompts", type=int, default=64, help="requests in the workload")
    p.add_argument("--input-len", default="32:512", help="prompt length range LO:HI (uniform)")
    p.add_argument("--output-len", default="16:256", help="output length range LO:HI (uniform, ignore_eos)")
    p.add_argument("--workload-seed", type=int, default=0, help="seed of the random workload")
    p.add_argument("--compare-hf", action="store_true", help="also run transformers generate and print the ratio")
    p.add_argument("--hf-batch-size", type=int, default=16, help="batch size of the transformers run")
    p.add_argument("--compare-llamacpp", default=None, metavar="FILE.gguf",
                   help="also run llama.cpp (needs llama-cpp-python) on this GGUF, the same requests one after "
                        "another (no batching in llama-cpp-python), and print the ratio")
    p.add_argument("--output-json", default=None, help="write the results to this JSON file")
    EngineArgs.add_cli_args(p)


def run_engine(llm, wl: Workload) -> float:
    from shardserve.sampling_params import SamplingParams
    params = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0) for o in wl.output_lens]
    llm.generate(prompt_token_ids=wl.prompts[:2], sampling_params=params[:2], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=wl.prompts, sampling_params=params, use_tqdm=True)
    elapsed = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == wl.num_output_tokens, (produced, wl.num_output_tokens)
    return elapsed


def run_hf(model_dir: str, wl: Workload, batch_size: int, dtype: torch.dtype, device: str = "cpu") -> float:
    from shardserve.bench.hf_peer import load_hf_peer
    model = load_hf_peer(model_dir, dtype, device)  # a HF directory or the same GGUF file
    pad = 0
    t0 = time.perf_counter()
    order = list(range(len(wl.prompts)))
    for b in tqdm(range(0, len(order), batch_size), desc="transformers", unit="batch"):
        idx = order[b:b + batch_size]
        longest = max(len(wl.prompts[i]) for i in idx)
        ids = torch.full((len(idx), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):  # left padding
            p = wl.prompts[i]
            ids[r, longest - len(p):] = torch.tensor(p)
            mask[r, longest - len(p):] = 1
        new = max(wl.output_lens[i] for i in idx)
        with torch.inference_mode():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=pad)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    from shardserve.engine.args import EngineArgs
    from shardserve.entrypoints.llm import LLM
    if args.compare_llamacpp:  # before the engine runs: a missing package or file is a clear error at once
        from shardserve.bench.llamacpp_peer import check_available
        check_available(args.compare_llamacpp)
    eargs = EngineArgs.from_cli(args)
    threads = torch.get_num_threads()  # the engine's threads; the llama.cpp peer gets as many
    llm = LLM(**vars(eargs))
    cfg = llm.engine.cfg if hasattr(llm.engine, "cfg") else None
    tok = llm.get_tokenizer()
    if tok is None:  # --skip-tokenizer-init: any id of the model's vocabulary but EOS
        vocab, special = cfg.model.vocab_size, set(getattr(llm.engine, "eos_token_ids", []))
    else:
        vocab, special = (min(len(tok), cfg.model.vocab_size) if cfg else len(tok)), set(tok.all_special_ids)
    wl = random_workload(args.num_prompts, parse_range(args.input_len), parse_range(args.output_len), vocab,
                         args.workload_seed, avoid=special)
    elapsed = run_engine(llm, wl)
    model_dir = cfg.model.model if cfg else eargs.model
    llm.shutdown()
    del llm  # an in-process engine holds its weights and KV cache until collected: free the GPU for transformers
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    res = {"engine_tok_s": wl.num_output_tokens / elapsed,
           "engine_total_tok_s": (wl.num_output_tokens + wl.num_prompt_tokens) / elapsed,
           "engine_elapsed_s": elapsed, "num_prompts": args.num_prompts, "output_tokens": wl.num_output_tokens,
           "prompt_tokens": wl.num_prompt_tokens, "model": model_dir,
           "tp": eargs.tensor_parallel_size, "pp": eargs.pipeline_parallel_size,
           "dtype": str(cfg.model.dtype).removeprefix("torch.") if cfg else None,
           "hardware": torch.cuda.get_device_name() if cfg and cfg.device.startswith("cuda") else
           f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__}
    print(f"engine:       {res['engine_tok_s']:.1f} output tok/s ({res['engine_total_tok_s']:.1f} total tok/s, "
          f"{elapsed:.1f} s for {wl.num_output_tokens} output tokens, {res['dtype']})")
    if args.compare_hf:
        hf_elapsed = run_hf(model_dir, wl, args.hf_batch_size, cfg.model.dtype if cfg else torch.float32,
                            cfg.device if cfg else "cpu")
        res.update(hf_tok_s=wl.num_output_tokens / hf_elapsed, hf_elapsed_s=hf_elapsed,
                   hf_batch_size=args.hf_batch_size)
        res["ratio"] = res["engine_tok_s"] / res["hf_tok_s"]
        print(f"transformers: {res['hf_tok_s']:.1f} output tok/s ({hf_elapsed:.1f} s, batch {args.hf_batch_size})")
        print(f"ratio:        {res['ratio']:.2f}x")
    if args.compare_llamacpp:
        from shardserve.bench.llamacpp_peer import throughput_run
        lc_elapsed, lc_out, info = throughput_run(args.compare_llamacpp, wl.prompts, wl.output_lens, threads,
                                                  gpu=bool(cfg and cfg.device.startswith("cuda")))
        assert lc_out == wl.num_output_tokens, (lc_out, wl.num_output_tokens)
        res.update(llamacpp_tok_s=lc_out / lc_elapsed, llamacpp_elapsed_s=lc_elapsed,
                   llamacpp_mode="sequential, batch 1 (llama-cpp-python has no batching)",
                   llamacpp={**info})
        res["llamacpp_ratio"] = res["engine_tok_s"] / res["llamacpp_tok_s"]
        print(f"llama.cpp:    {res['llamacpp_tok_s']:.1f} output tok/s ({lc_elapsed:.1f} s; the requests one after "
              f"another, batch 1: llama-cpp-python has no batching; {info['threads']} threads, "
              f"llama-cpp-python {info['llama_cpp_python']})")
        print(f"ratio:        {res['llamacpp_ratio']:.2f}x (engine / llama.cpp)")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
