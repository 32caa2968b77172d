"""The llama.cpp peer of `bench latency` and `bench throughput` (`--compare-llamacpp FILE.gguf`), through
llama-cpp-python, an optional package that is imported only when the flag is given (it is not a dependency).

The peer is fed the exact prompt token ids the engine got (no tokenizer on either side) and produces exactly the
engine's number of output tokens, greedy, EOS ignored: `Llama.eval` on the prompt and `Llama.sample(temp=0)` for
the first token (the prefill, as the engine's latency bench counts it: until the first token exists), then
`eval([token])` + `sample` for each further token (one decode step). No `generate`/`create_completion`, so no EOS
or stop string can end a run early.

llama-cpp-python decodes one sequence at a time: the latency peer runs batch 1 only, and the throughput peer runs the
workload's requests one after another. llama.cpp computes with the file's own tensor types (e.g. Q4_1 matmuls),
whatever `--dtype` the engine dequantizes to. Threads: the engine's torch thread count (`torch.get_num_threads()`)
for both prompt and decode (`n_threads`, `n_threads_batch`)."""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Sequence

__all__ = ["INSTALL_HINT", "FLAG", "check_available", "LlamaCppPeer", "latency_rows", "median_row", "throughput_run"]

FLAG = "--compare-llamacpp"
INSTALL_HINT = ("install it with `pip install llama-cpp-python` (it builds llama.cpp from source with cmake and a C++ "
                "compiler, a few minutes; for a BLAS build set CMAKE_ARGS, e.g. "
                "CMAKE_ARGS=\"-DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS\", optional), or drop " + FLAG)


def _import():
    try:
        import llama_cpp
    except ImportError as e:  # also a sys.modules entry of None
        raise ValueError(f"{FLAG} needs the llama-cpp-python package, which is not installed; {INSTALL_HINT}") from e
    return llama_cpp


def check_available(gguf: str | os.PathLike) -> str:
    """Fail fast, before the engine runs: llama-cpp-python importable and the GGUF file present. Its version."""
    llama_cpp = _import()
    if not os.path.isfile(gguf):
        raise ValueError(f"{FLAG} {gguf}: no such file (give the path of a .gguf file for llama.cpp to load)")
    return str(getattr(llama_cpp, "__version__", "unknown"))


class LlamaCppPeer:
    """One llama.cpp model and context (batch 1); `run(prompt_ids, n)` times one request."""

    def __init__(self, gguf: str | os.PathLike, n_ctx: int, threads: int, gpu: bool = False) -> None:
        llama_cpp = _import()
        self.version = str(getattr(llama_cpp, "__version__", "unknown"))
        self.path, self.threads = str(gguf), max(1, int(threads))
        self.n_ctx = max(512, -(-int(n_ctx) // 256) * 256)  # room for prompt + output, a round size
        self.llm = llama_cpp.Llama(model_path=self.path, n_ctx=self.n_ctx, n_threads=self.threads,
                                   n_threads_batch=self.threads, n_gpu_layers=-1 if gpu else 0, verbose=False)
        self.n_vocab = int(self.llm.n_vocab())

    def run(self, prompt: Sequence[int], n_out: int) -> dict[str, Any]:
        """Exactly `n_out` greedy tokens after `prompt` (token ids fed as given, EOS not checked).
        prefill_ms: eval(prompt) + the first token's sample; tpot_ms: mean of eval([tok]) + sample."""
        prompt = [int(t) for t in prompt]
        if not prompt or n_out < 1:
            raise ValueError("the llama.cpp peer needs a non-empty prompt and at least one output token")
        bad = [t for t in prompt if not 0 <= t < self.n_vocab]
        if bad:
            raise ValueError(f"{FLAG} {self.path}: prompt token id {bad[0]} is outside its vocabulary of "
                             f"{self.n_vocab}; the GGUF must be the engine's model (same tokenizer)")
        if len(prompt) + n_out > self.n_ctx:
            raise ValueError(f"llama.cpp context {self.n_ctx} < {len(prompt)} prompt + {n_out} output tokens")
        llm = self.llm
        llm.reset()  # position 0: the next eval drops the old KV entries
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = int(llm.sample(temp=0.0, repeat_penalty=1.0))
        prefill = time.perf_counter() - t0
        tokens, steps = [tok], []
        for _ in range(n_out - 1):
            t0 = time.perf_counter()
            llm.eval([tok])
            tok = int(llm.sample(temp=0.0, repeat_penalty=1.0))
            steps.append(time.perf_counter() - t0)
            tokens.append(tok)
        decode = sum(steps)
        return {"prefill_ms": prefill * 1e3, "tpot_ms": decode / len(steps) * 1e3 if steps else None,
                "decode_steps": len(steps), "output_tokens": len(tokens), "elapsed_s": prefill + decode,
                "token_ids": tokens}

    def info(self) -> dict[str, Any]:
        return {"gguf": self.path, "llama_cpp_python": self.version, "threads": self.threads, "n_ctx": self.n_ctx}

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()
        self.llm = None


def median_row(runs: list[dict]) -> dict[str, Any]:
    """Median prefill and TPOT over measured runs (token ids dropped), with decode tok/s at batch 1."""
    def med(key: str) -> float | None:
        vals = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(vals) if vals else None
    row = {"batch_size": 1, "prefill_ms": med("prefill_ms"), "tpot_ms": med("tpot_ms"),
           "decode_steps": runs[0]["decode_steps"], "output_tokens": runs[0]["output_tokens"],
           "runs": [{k: v for k, v in r.items() if k != "token_ids"} for r in runs]}
    row["decode_tok_s"] = 1e3 / row["tpot_ms"] if row["tpot_ms"] else None
    return row


def latency_rows(gguf: str, prompts: list[list[int]], output_len: int, threads: int, gpu: bool = False
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """`bench latency`'s peer at batch 1: prompts[0] warms up, the others are measured (the engine's prompts, in
    its order). (median row, peer info)."""
    peer = LlamaCppPeer(gguf, max(len(p) for p in prompts) + output_len, threads, gpu)
    try:
        runs = [peer.run(p, output_len) for p in prompts]
        return median_row(runs[1:] if len(runs) > 1 else runs), peer.info()
    finally:
        peer.close()


def throughput_run(gguf: str, prompts: list[list[int]], output_lens: list[int], threads: int, gpu: bool = False,
                   progress: bool = True) -> tuple[float, int, dict[str, Any]]:
    """`bench throughput`'s peer: every request one after another (llama-cpp-python has no batching), after one
    untimed warm-up request. (elapsed seconds, output tokens produced, peer info)."""
    from tqdm import tqdm
    peer = LlamaCppPeer(gguf, max(len(p) + o for p, o in zip(prompts, output_lens)), threads, gpu)
    try:
        peer.run(prompts[0][:32], min(4, output_lens[0]))  # warm-up
        produced = 0
        t0 = time.perf_counter()
        for p, o in tqdm(list(zip(prompts, output_lens)), desc="llama.cpp", unit="req", disable=not progress):
            produced += peer.run(p, o)["output_tokens"]
        return time.perf_counter() - t0, produced, peer.info()
    finally:
        peer.close()
