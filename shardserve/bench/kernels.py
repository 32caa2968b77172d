"""`shardserve bench kernels`: each Triton kernel of the GPU path against the torch code it replaces, on the same
inputs, per shape: paged decode and paged prefill attention (vs the torch backend: gathered blocks +
scaled_dot_product_attention), RMSNorm with the residual add, rotary, SiLU·mul (vs the torch modules).

Shapes follow a Llama-3-8B layer by default (32 heads, 8 KV heads, head_dim 128, hidden 4096, intermediate 14336);
--heads/--kv-heads/--head-dim/--hidden/--intermediate change them. Time per call: CUDA events on a GPU (median of
--iters after warm-up), perf_counter on CPU. Every case also checks the kernel's output against the torch result
(max |diff| is reported), so a fast wrong kernel cannot pass for a fast one.

On CPU the Triton side runs in the interpreter (TRITON_INTERPRET=1 must be set before start-up): its times say
nothing about speed, only that the comparison runs; use a GPU for numbers.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from typing import Any, Callable

import torch
from tqdm import tqdm

__all__ = ["add_args", "run"]

OPS = ("decode", "prefill", "add_rms_norm", "rotary", "silu_and_mul")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu or cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--ops", default=",".join(OPS), help="comma list of " + ", ".join(OPS))
    p.add_argument("--batch-sizes", default="1,16,64", help="decode: sequences per step")
    p.add_argument("--context-lens", default="512,2048", help="decode: context tokens per sequence")
    p.add_argument("--prefill", default="1x2048,4x512,1x512+1536",
                   help="prefill cases: SEQSxTOKENS, +PREFIX for chunks after a cached prefix")
    p.add_argument("--tokens", default="1,64,4096", help="norm / rotary / SiLU: tokens per call")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=50, help="timed calls per case (after 5 warm-up calls)")
    p.add_argument("--output-json", default=None,
                   help="write {'results': [{op, shape, torch_us, triton_us, speedup, max_abs_diff}]}")


def _time_us(fn: Callable[[], Any], iters: int, cuda: bool) -> float:
    for _ in range(min(5, iters)):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def _paged(lens: list[int], q_lens: list[int], a: argparse.Namespace, dtype, dev, g):
    """q/k/v of this step, a cache holding every context (shuffled blocks), and the step's AttentionMetadata."""
    from shardserve.layers.attention.base import AttentionMetadata
    bs = a.block_size
    nblocks = [-(-n // bs) for n in lens]
    perm = torch.randperm(sum(nblocks), generator=g)
    tables = torch.zeros(len(lens), max(nblocks), dtype=torch.int64)
    slots, start = [], 0
    for i, (n, q) in enumerate(zip(lens, q_lens)):
        tables[i, :nblocks[i]] = perm[start:start + nblocks[i]]
        start += nblocks[i]
        slots += [int(tables[i, p // bs]) * bs + p % bs for p in range(n - q, n)]
    cache = torch.randn(2, a.kv_heads, sum(nblocks), bs, a.head_dim, generator=g).to(dev, dtype)
    t = sum(q_lens)
    q = torch.randn(t, a.heads, a.head_dim, generator=g).to(dev, dtype)
    k = torch.randn(t, a.kv_heads, a.head_dim, generator=g).to(dev, dtype)
    v = torch.randn(t, a.kv_heads, a.head_dim, generator=g).to(dev, dtype)
    decodes = len(q_lens) if all(n == 1 for n in q_lens) else 0
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots, device=dev), block_tables=tables.to(dev),
                             seq_lens=lens, query_lens=q_lens, seq_lens_tensor=torch.tensor(lens, device=dev),
                             num_decodes=decodes, block_size=bs)
    return q, k, v, cache, meta


def _attention_cases(a: argparse.Namespace, ops: list[str], dtype, dev, g):
    from shardserve.layers.attention.torch_backend import TorchAttentionBackend
    from shardserve.layers.attention.triton_backend import TritonAttentionBackend
    scale = a.head_dim ** -0.5
    ref_b, tri_b = TorchAttentionBackend(), TritonAttentionBackend()
    cases = []
    if "decode" in ops:
        for b in _ints(a.batch_sizes):
            for ctx in _ints(a.context_lens):
                cases.append(("decode", f"batch {b} x ctx {ctx}", [ctx] * b, [1] * b))
    if "prefill" in ops:
        for spec in a.prefill.split(","):
            seqs, _, rest = spec.strip().partition("x")
            tokens, _, prefix = rest.partition("+")
            n, p = int(tokens), int(prefix or 0)
            cases.append(("prefill", f"{seqs} x {n}" + (f" after {p} cached" if p else ""),
                          [n + p] * int(seqs), [n] * int(seqs)))
    for op, shape, lens, q_lens in cases:  # made one at a time: a case's cache is freed before the next
        inputs = (*_paged(lens, q_lens, a, dtype, dev, g), scale)
        yield op, shape, (lambda x=inputs: ref_b.forward(*x)), (lambda x=inputs: tri_b.forward(*x))


def _layer_cases(a: argparse.Namespace, ops: list[str], dtype, dev, g):
    from shardserve.layers import fused_kernels as fk
    from shardserve.layers.activation import SiluAndMul
    from shardserve.layers.norm import RMSNorm
    from shardserve.layers.rotary import RotaryEmbedding
    norm = RMSNorm(a.hidden, 1e-5, dtype).to(dev)
    rope = RotaryEmbedding(a.head_dim, 8192, {"rope_type": "default", "rope_theta": 500000.0}).to(dev)
    for t in _ints(a.tokens):
        shape = f"{t} tokens"
        if "add_rms_norm" in ops:
            x = torch.randn(t, a.hidden, generator=g).to(dev, dtype)
            r = torch.randn(t, a.hidden, generator=g).to(dev, dtype)
            yield ("add_rms_norm", f"{shape} x {a.hidden}", lambda x=x, r=r: norm.forward_native(x, r)[0],
                   lambda x=x, r=r: fk.fused_add_rms_norm(x, r, norm.weight, norm.eps)[0])
        if "rotary" in ops:
            qkv = torch.randn(t, (a.heads + 2 * a.kv_heads) * a.head_dim, generator=g).to(dev, dtype)
            q = qkv[:, :a.heads * a.head_dim].view(t, a.heads, a.head_dim)
            k = qkv[:, a.heads * a.head_dim:(a.heads + a.kv_heads) * a.head_dim].view(t, a.kv_heads, a.head_dim)
            pos = torch.randint(0, 8192, (t,), generator=g).to(dev)
            yield ("rotary", f"{shape}, {a.heads}+{a.kv_heads} heads",
                   lambda q=q, k=k, pos=pos: rope.forward_native(pos, q, k)[0],
                   lambda q=q, k=k, pos=pos: fk.rotary_embedding(pos, q, k, rope.cos_cache, rope.sin_cache)[0])
        if "silu_and_mul" in ops:
            x = torch.randn(t, 2 * a.intermediate, generator=g).to(dev, dtype)
            yield ("silu_and_mul", f"{shape} x {a.intermediate}", lambda x=x: SiluAndMul.forward_native(x),
                   lambda x=x: fk.silu_and_mul(x))


def _ints(s: str) -> list[int]:
    return [int(x) for x in str(s).split(",") if x.strip()]


def run(args: argparse.Namespace) -> int:
    from shardserve.bench.bandwidth import device_name
    from shardserve.bench.comm import _hardware
    from shardserve.config import resolve_device
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = sorted(set(ops) - set(OPS))
    if bad:
        raise ValueError(f"--ops: unknown {', '.join(bad)}; choose from {', '.join(OPS)}")
    if args.heads % args.kv_heads:
        raise ValueError(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("bench kernels on CPU needs TRITON_INTERPRET=1 in the environment (the Triton interpreter; "
                         "its times are not speed numbers): use --device cuda on a GPU")
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    rows = []
    cases = itertools.chain(_attention_cases(args, ops, dtype, device, g), _layer_cases(args, ops, dtype, device, g))
    with torch.inference_mode():
        for op, shape, ref_fn, tri_fn in tqdm(cases, desc="bench kernels", unit="case"):
            diff = (ref_fn().float() - tri_fn().float()).abs().max().item()
            t_ref = _time_us(ref_fn, args.iters, cuda)
            t_tri = _time_us(tri_fn, args.iters, cuda)
            rows.append({"op": op, "shape": shape, "torch_us": t_ref, "triton_us": t_tri,
                         "speedup": t_ref / t_tri, "max_abs_diff": diff})
    hw = device_name(device, _hardware())
    print(f"\nbench kernels: {args.dtype} on {hw}" + ("" if cuda else " (Triton INTERPRETER: not speed numbers)"))
    print(f"{'op':<13} {'shape':<32} {'torch us':>10} {'triton us':>10} {'speedup':>8} {'max|diff|':>10}")
    for r in rows:
        print(f"{r['op']:<13} {r['shape']:<32} {r['torch_us']:>10.1f} {r['triton_us']:>10.1f} "
              f"{r['speedup']:>7.2f}x {r['max_abs_diff']:>10.2e}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": hw, "dtype": args.dtype, "interpreted": not cuda, "torch": torch.__version__,
                       "results": rows}, f, indent=2)
    return 0
