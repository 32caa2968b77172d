"""The `shardserve` command: generate on a model dir, make-tiny-model, help text, and readable start-up errors."""
from __future__ import annotations

import json

import pytest

from shardserve.entrypoints.cli import main


def test_generate_json_greedy_matches_offline_api(tiny_model, capsys):
    rc = main(["generate", "--model", str(tiny_model), "--device", "cpu", "--kv-cache-memory", "32MiB",
               "--max-model-len", "256", "--prompt", "Hello world", "--prompt", "Once", "--max-tokens", "5",
               "--ignore-eos", "--json"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["prompt"] for x in lines] == ["Hello world", "Once"]
    assert all(len(x["token_ids"]) == 5 and x["finish_reason"] == "length" for x in lines)
    from shardserve import LLM, SamplingParams
    llm = LLM(model=str(tiny_model), device="cpu", kv_cache_memory="32MiB", max_model_len=256,
              use_tqdm_on_load=False)
    ref = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert ref[0].outputs[0].token_ids == lines[0]["token_ids"]


def test_make_tiny_model(tmp_path, capsys):
    assert main(["make-tiny-model", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "model.safetensors").is_file()


@pytest.mark.parametrize("argv,msg", [
    (["generate", "--prompt", "x", "--max-model-len", "999999"], "--max-model-len 999999 exceeds"),
    (["generate", "--prompt", "x", "-tp", "9"], "--tensor-parallel-size 9"),  # 8 heads: at most 8 ranks
    (["generate", "--prompt", "x", "--kv-cache-memory", "lots"], "cannot parse size 'lots'"),
    (["generate", "--prompt", "x", "--device", "tpu"], "--device 'tpu' is not supported"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "temperature"),
])
def test_bad_flags_give_one_clear_line(tiny_model, capsys, argv, msg):
    rc = main(argv[:1] + ["--model", str(tiny_model)] + argv[1:])
    err = capsys.readouterr().err
    assert rc == 2
    assert msg in err and "Traceback" not in err


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--tensor-parallel-size", "--pipeline-parallel-size", "--kv-cache-memory", "--max-num-seqs",
                 "SmolLM2-135M-Instruct", "GGUF", "--enable-prefix-caching"):
        assert flag in out
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "generate" in top and "chat" in top and "bench" in top and "plan" in top
