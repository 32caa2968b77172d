"""`--compare-llamacpp` of `bench latency` and `bench throughput`: without llama-cpp-python a clean CLI error with the
install hint; with a stub `llama_cpp` module the peer gets the engine's exact prompt token ids and output counts, and
the ratio is printed (and written to the JSON)."""
from __future__ import annotations

import argparse
import json
import sys
import types

import pytest
import torch

from shardserve.bench import latency, llamacpp_peer, throughput

EOS = 2


class FakeLlama:
    """Deterministic stand-in for llama_cpp.Llama: records every call. sample() returns EOS first (the peer must
    not stop on it), then 100 + the number of tokens evaluated so far."""
    instances: list["FakeLlama"] = []
    n_vocab_value = 1 << 16

    def __init__(self, model_path: str, **kwargs) -> None:
        self.model_path, self.kwargs = model_path, kwargs
        self.n_tokens = 0
        self.calls: list[tuple] = []
        self.closed = False
        FakeLlama.instances.append(self)

    def n_vocab(self) -> int:
        return self.n_vocab_value

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return [len(w) for w in text.split()]

    def reset(self) -> None:
        self.calls.append(("reset",))
        self.n_tokens = 0

    def eval(self, tokens) -> None:
        tokens = list(tokens)
        self.calls.append(("eval", tokens))
        self.n_tokens += len(tokens)

    def sample(self, **kw) -> int:
        self.calls.append(("sample", kw))
        first = self.calls[-2][0] == "eval" and len(self.calls) >= 3 and self.calls[-3] == ("reset",)
        return EOS if first else 100 + self.n_tokens

    def close(self) -> None:
        self.closed = True

    def requests(self) -> list[tuple[list[int], int]]:
        """(prompt ids, tokens sampled) per reset → next reset."""
        out: list[tuple[list[int], int]] = []
        for c in self.calls:
            if c[0] == "reset":
                out.append(([], 0))
            elif c[0] == "eval" and out[-1][1] == 0:
                out[-1] = (c[1], 0)
            elif c[0] == "sample":
                out[-1] = (out[-1][0], out[-1][1] + 1)
        return out


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    mod = types.ModuleType("llama_cpp")
    mod.Llama = FakeLlama
    mod.__version__ = "0.0-fake"
    FakeLlama.instances = []
    monkeypatch.setitem(sys.modules, "llama_cpp", mod)
    return mod


@pytest.fixture
def gguf(tmp_path):
    path = tmp_path / "peer.gguf"
    path.write_bytes(b"GGUF")
    return path


def _parse(mod, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    mod.add_args(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("bench", ["latency", "throughput"])
def test_without_llama_cpp_the_flag_is_a_clean_cli_error(bench, monkeypatch, tmp_path, capsys):
    from shardserve.entrypoints import cli, llm
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # absent, even where it is installed

    def no_engine(*a, **k):
        raise AssertionError("the engine must not start when the peer cannot run")
    monkeypatch.setattr(llm.LLM, "__init__", no_engine)
    rc = cli.main(["bench", bench, "--compare-llamacpp", str(tmp_path / "m.gguf"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--compare-llamacpp needs the llama-cpp-python package" in err
    assert "pip install llama-cpp-python" in err and "cmake" in err and "CMAKE_ARGS" in err
    assert "Traceback" not in err


def test_missing_gguf_file_and_latency_without_batch_1_are_refused(fake_llama_cpp, tmp_path, gguf):
    with pytest.raises(ValueError, match="no such file"):
        llamacpp_peer.check_available(tmp_path / "nope.gguf")
    with pytest.raises(ValueError, match="batch 1 only.*include 1 in --batch-sizes"):
        latency.run(_parse(latency, ["--compare-llamacpp", str(gguf), "--batch-sizes", "4,8"]))
    assert FakeLlama.instances == []


def test_peer_feeds_exact_ids_and_makes_exactly_n_tokens_past_eos(fake_llama_cpp, gguf):
    peer = llamacpp_peer.LlamaCppPeer(gguf, n_ctx=40, threads=3)
    fake = FakeLlama.instances[0]
    assert fake.model_path == str(gguf)
    assert fake.kwargs["n_threads"] == fake.kwargs["n_threads_batch"] == 3
    assert fake.kwargs["n_ctx"] >= 40 and fake.kwargs["n_gpu_layers"] == 0
    prompt = [7, 8, 9, 10, 11]
    r = peer.run(prompt, 5)
    assert r["token_ids"] == [EOS, 106, 107, 108, 109]  # EOS first, and it goes on
    assert r["output_tokens"] == 5 and r["decode_steps"] == 4
    assert r["prefill_ms"] > 0 and r["tpot_ms"] > 0
    evals = [c[1] for c in fake.calls if c[0] == "eval"]
    assert evals == [prompt, [EOS], [106], [107], [108]]
    assert fake.calls[0] == ("reset",)
    samples = [c[1] for c in fake.calls if c[0] == "sample"]
    assert len(samples) == 5 and all(s["temp"] == 0.0 for s in samples)  # greedy
    with pytest.raises(ValueError, match="outside its vocabulary"):
        peer.run([FakeLlama.n_vocab_value], 2)
    peer.close()
    assert fake.closed


def test_latency_bench_runs_the_peer_on_the_engines_batch1_prompts(fake_llama_cpp, gguf, tiny_model, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.setenv("SHARDSERVE_COMM_TIMING", "0")
    seen: list[list[int]] = []
    real_one_run = latency._one_run

    def recording(engine, rec, prompts, output_len, tag):
        if len(prompts) == 1:
            seen.append(list(prompts[0]))
        return real_one_run(engine, rec, prompts, output_len, tag)
    monkeypatch.setattr(latency, "_one_run", recording)
    out = tmp_path / "lat.json"
    args = _parse(latency, ["--model", str(tiny_model), "--device", "cpu", "--kv-cache-memory", "8MiB",
                            "--max-model-len", "256", "--input-len", "8", "--output-len", "4", "--batch-sizes", "1,2",
                            "--iters", "2", "--no-comm-timing", "--compare-llamacpp", str(gguf),
                            "--output-json", str(out)])
    assert latency.run(args) == 0
    (fake,) = FakeLlama.instances
    assert fake.kwargs["n_threads"] == torch.get_num_threads()
    assert fake.requests() == [(p, 4) for p in seen] and len(seen) == 3  # warm-up + 2 measured, same ids
    text = capsys.readouterr().out
    assert "llama.cpp peer: llama-cpp-python 0.0-fake" in text
    assert "ratio (engine / llama.cpp, batch 1): decode" in text
    assert "batch 2: no llama.cpp row" in text
    data = json.loads(out.read_text())
    (row,) = data["llamacpp"]["results"]
    assert data["llamacpp"]["gguf"] == str(gguf) and data["llamacpp"]["batch_size"] == 1
    assert row["output_tokens"] == 4 and row["decode_steps"] == 3 and len(row["runs"]) == 2
    eng1 = data["results"][0]
    assert row["decode_ratio"] == pytest.approx(row["tpot_ms"] / eng1["tpot_ms"])
    assert row["prefill_ratio"] == pytest.approx(row["prefill_ms"] / eng1["prefill_ms"])


def test_throughput_bench_runs_the_same_requests_one_after_another(fake_llama_cpp, gguf, tiny_model, tmp_path,
                                                                     monkeypatch, capsys):
    seen = []
    real_run_engine = throughput.run_engine

    def recording(llm, wl):
        seen.append(wl)
        return real_run_engine(llm, wl)
    monkeypatch.setattr(throughput, "run_engine", recording)
    out = tmp_path / "tp.json"
    args = _parse(throughput, ["--model", str(tiny_model), "--device", "cpu", "--kv-cache-memory", "8MiB",
                               "--max-model-len", "256", "--num-prompts", "3", "--input-len", "4:8",
                               "--output-len", "2:5", "--compare-llamacpp", str(gguf), "--output-json", str(out)])
    assert throughput.run(args) == 0
    (wl,) = seen
    (fake,) = FakeLlama.instances
    reqs = fake.requests()[1:]  # after the warm-up request
    assert reqs == [(p, o) for p, o in zip(wl.prompts, wl.output_lens)]
    text = capsys.readouterr().out
    assert "llama.cpp:" in text and "one after another" in text and "(engine / llama.cpp)" in text
    data = json.loads(out.read_text())
    assert data["llamacpp_tok_s"] == pytest.approx(wl.num_output_tokens / data["llamacpp_elapsed_s"])
    assert data["llamacpp_ratio"] == pytest.approx(data["engine_tok_s"] / data["llamacpp_tok_s"])
    assert data["llamacpp"]["threads"] == torch.get_num_threads() and "sequential" in data["llamacpp_mode"]
    assert data["dtype"] in ("float32", "bfloat16") and f"output tokens, {data['dtype']})" in text
