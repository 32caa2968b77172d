"""`make-random-model --like PRESET`: the preset's shape (scaled down here with overrides) written as a sharded
checkpoint that transformers loads without missing keys and the engine serves identically to transformers."""
from __future__ import annotations

import json

import pytest
import torch

from shardserve.entrypoints.cli import main

SMALL = ["--override", "hidden_size=64", "--override", "intermediate_size=128", "--override", "num_hidden_layers=2",
         "--override", "num_attention_heads=4", "--override", "num_key_value_heads=2", "--override", "vocab_size=512",
         "--override", "head_dim=16"]


@pytest.mark.parametrize("like", ["llama-3.1-8b", "qwen3-0.6b", "mixtral-8x7b"])
def test_random_preset_loads_in_transformers_and_matches_engine(tmp_path, like):
    out = tmp_path / like
    assert main(["make-random-model", str(out), "--like", like, "--dtype", "float32", "--shard-size", "100KiB",
                 *SMALL]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["architectures"]
    from transformers import AutoModelForCausalLM
    hf, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    from checkpoints import engine_llm, hf_greedy
    from shardserve import SamplingParams
    llm = engine_llm(out, max_model_len=256)
    got = llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(
        temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    llm.shutdown()
    assert got == hf_greedy(out, [[5, 6, 7, 8]], 5)[0]


def test_bad_override_is_a_clear_error(tmp_path, capsys):
    assert main(["make-random-model", str(tmp_path / "x"), "--like", "llama-3.1-8b", "--override", "oops"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
