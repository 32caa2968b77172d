"""Tests for the built-in tiny Llama: HF-loadable weights and tokenizer, determinism, the cached default copy."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shardserve.models import tiny
from shardserve.models.tiny import (BOS_ID, EOS_ID, IM_END_ID, IM_START_ID, PAD_ID, TINY_MODEL_NAME, VOCAB_SIZE,
                                    build_tiny_tokenizer, default_model_dir, ensure_default_model,
                                    generate_tiny_weights, is_complete_model_dir, tiny_model_config,
                                    tiny_weight_specs, write_tiny_model)

EXPECTED_PARAMS = 31_990_272
TEXTS = ["Hello, world!", "héllo wörld 日本 🙂", "", " leading and trailing spaces  ", "tabs\tand\nnew\r\nlines\n\n",
         "def f(x):\n    return x ** 2  # code", "Numbers 1234567 and 3.14159, 1e-5.", "a" * 300,
         "emoji family 👩‍👩‍👧 and flags 🇯🇵, RTL مرحبا, Cyrillic привет", "<not special> <|im_start nope"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    t0 = time.perf_counter()
    out = write_tiny_model(tmp_path_factory.mktemp("tiny") / "m")
    print(f"write_tiny_model took {time.perf_counter() - t0:.2f}s")
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


# ---- config and weights -----------------------------------------------------------------------------------

def test_directory_contents(model_dir):
    assert is_complete_model_dir(model_dir)
    assert json.loads((model_dir / "config.json").read_text()) == tiny_model_config()
    assert "random" in (model_dir / "README.md").read_text().lower()
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["bos_token_id"] == BOS_ID and gen["eos_token_id"] == [EOS_ID, IM_END_ID]


def test_config_is_the_specified_llama():
    from transformers import LlamaConfig
    cfg = LlamaConfig(**tiny_model_config())
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (512, 1408, 8)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (8, 4, 64, 8192)
    assert cfg.max_position_embeddings == 2048 and cfg.rms_norm_eps == 1e-5 and not cfg.tie_word_embeddings
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert sum(torch.Size(s).numel() for _, s in tiny_weight_specs()) == EXPECTED_PARAMS


def test_transformers_loads_it_with_no_missing_or_unexpected_keys(model_dir, hf_tokenizer):
    from transformers import AutoModelForCausalLM, GenerationConfig
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not info["error_msgs"]
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS
    on_disk = load_file(str(model_dir / "model.safetensors"))
    state = model.state_dict()
    assert set(on_disk) == set(state)
    assert all(torch.equal(state[k], v) for k, v in on_disk.items())
    ids = hf_tokenizer("The cat sat on the mat", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], VOCAB_SIZE) and torch.isfinite(logits).all()
    gen = GenerationConfig.from_pretrained(model_dir)
    assert gen.eos_token_id == [EOS_ID, IM_END_ID] and gen.pad_token_id == PAD_ID


def test_weight_names_shapes_and_statistics(model_dir):
    w = load_file(str(model_dir / "model.safetensors"))
    assert set(w) == {n for n, _ in tiny_weight_specs()} and len(w) == 2 + 8 * 9 + 1
    for name, shape in tiny_weight_specs():
        t = w[name]
        assert t.dtype == torch.float32 and tuple(t.shape) == shape
        if name.endswith("norm.weight"):
            assert torch.equal(t, torch.ones(shape))
        else:
            assert abs(t.mean().item()) < 2e-3 and abs(t.std().item() - 0.02) < 1e-3, name
    assert not torch.equal(w["model.embed_tokens.weight"], w["lm_head.weight"])  # untied


def test_weights_are_deterministic(model_dir):
    """Same bytes on every run, and bit-exact pinned values (a canary for every machine). If the pins fail after
    a torch upgrade, torch changed its float64 normal_ sampler: bump tiny.CACHE_SUBDIR so that old caches are
    not mistaken for the new model."""
    on_disk = load_file(str(model_dir / "model.safetensors"))
    again = generate_tiny_weights(seed=0)
    assert all(torch.equal(on_disk[k], v) for k, v in again.items())
    assert again["model.embed_tokens.weight"][0, :3].tolist() == PINNED_EMBED_0
    assert again["lm_head.weight"][-1, -3:].tolist() == PINNED_LM_HEAD_LAST
    other = generate_tiny_weights(seed=1)
    assert not torch.equal(other["model.layers.0.self_attn.q_proj.weight"],
                           on_disk["model.layers.0.self_attn.q_proj.weight"])


PINNED_EMBED_0 = [-0.04620823636651039, -0.007465017028152943, -0.02121633291244507]
PINNED_LM_HEAD_LAST = [0.012402933090925217, -0.0052724857814610004, 0.03224755823612213]


# ---- tokenizer --------------------------------------------------------------------------------------------

def test_tokenizer_training_is_deterministic(model_dir):
    first = build_tiny_tokenizer().to_str(pretty=True)
    assert build_tiny_tokenizer().to_str(pretty=True) == first
    assert json.loads((model_dir / "tokenizer.json").read_text()) == json.loads(first)
    # A fresh process (new hash seeds) with a different thread count produces the same bytes.
    code = ("import hashlib; from shardserve.models.tiny import build_tiny_tokenizer; "
            "print(hashlib.sha256(build_tiny_tokenizer().to_str(pretty=True).encode()).hexdigest())")
    env = dict(os.environ, RAYON_NUM_THREADS="2", TOKENIZERS_PARALLELISM="true", PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(first.encode()).hexdigest()


def test_training_leaves_the_parallelism_setting_alone(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    build_tiny_tokenizer()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    build_tiny_tokenizer()
    assert "TOKENIZERS_PARALLELISM" not in os.environ


def test_tokenizer_vocab_and_special_tokens(hf_tokenizer):
    tok = hf_tokenizer
    assert len(tok) == VOCAB_SIZE == tiny_model_config()["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|end_of_text|>" and tok.pad_token == "<|pad|>"
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [IM_START_ID, IM_END_ID]
    assert tok.model_max_length == 2048
    ids = tok("<|im_start|>user", add_special_tokens=False).input_ids
    assert ids[0] == IM_START_ID and IM_START_ID not in ids[1:]
    # It is a trained BPE, not a byte tokenizer: common English words are single tokens.
    assert len(tok(" the cat sat on the", add_special_tokens=False).input_ids) == 5


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_text_exactly(hf_tokenizer, text):
    ids = hf_tokenizer(text).input_ids
    assert ids[0] == BOS_ID and BOS_ID not in ids[1:]  # the post-processor prepends exactly one BOS
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert hf_tokenizer.decode(ids) == "<|begin_of_text|>" + text
    assert hf_tokenizer.decode(hf_tokenizer(text, add_special_tokens=False).input_ids) == text


def test_chat_template(hf_tokenizer):
    tok = hf_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == ("<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n"
                      "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n")
    without = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert prompt == without + "<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1 and ids.count(IM_START_ID) == 3
    assert tok.decode(ids) == prompt
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there!"}]}]
    assert tok.apply_chat_template(parts, tokenize=False) == "<|begin_of_text|><|im_start|>user\nHi there!<|im_end|>\n"


# ---- the cached default copy ------------------------------------------------------------------------------

def test_default_model_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDSERVE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_model_dir() == tmp_path / "a" / "tiny-llama-v1"
    monkeypatch.delenv("SHARDSERVE_CACHE")
    assert default_model_dir() == tmp_path / "x" / "shardserve" / "tiny-llama-v1"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model_dir() == tmp_path / "home" / ".cache" / "shardserve" / "tiny-llama-v1"
    assert TINY_MODEL_NAME == "shardserve-tiny-llama"


def _patch_writer(monkeypatch, model_dir: Path, on_write=None) -> list[Path]:
    """Make builds cheap: copy the module's model instead of regenerating it."""
    calls: list[Path] = []

    def fake_write(out_dir, seed=0, progress=False):
        calls.append(Path(out_dir))
        for f in model_dir.iterdir():
            os.link(f, Path(out_dir) / f.name)
        if on_write:
            on_write()
        return Path(out_dir)

    monkeypatch.setattr(tiny, "write_tiny_model", fake_write)
    return calls


def test_ensure_default_model_writes_once(monkeypatch, tmp_path, model_dir):
    monkeypatch.setenv("SHARDSERVE_CACHE", str(tmp_path))
    calls = _patch_writer(monkeypatch, model_dir)
    path = ensure_default_model(progress=False)
    assert path == tmp_path / "tiny-llama-v1" and is_complete_model_dir(path)
    assert oct(path.stat().st_mode & 0o777) == "0o755"
    assert ensure_default_model(progress=False) == path and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama-v1"]  # no temp dirs left


def test_ensure_default_model_loses_a_race_gracefully(monkeypatch, tmp_path, model_dir):
    """Another process installs the model while this one is building: ours is discarded, theirs is used."""
    monkeypatch.setenv("SHARDSERVE_CACHE", str(tmp_path))
    final = tmp_path / "tiny-llama-v1"

    def other_process_wins():
        final.mkdir()
        for f in model_dir.iterdir():
            os.link(f, final / f.name)
        (final / "marker").write_text("theirs")

    _patch_writer(monkeypatch, model_dir, on_write=other_process_wins)
    assert ensure_default_model(progress=False) == final
    assert (final / "marker").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama-v1"]


def test_ensure_default_model_replaces_a_broken_directory(monkeypatch, tmp_path, model_dir):
    monkeypatch.setenv("SHARDSERVE_CACHE", str(tmp_path))
    broken = tmp_path / "tiny-llama-v1"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    calls = _patch_writer(monkeypatch, model_dir)
    assert ensure_default_model(progress=False) == broken and is_complete_model_dir(broken)
    assert len(calls) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama-v1"]


@pytest.mark.slow
def test_two_processes_racing_both_get_a_complete_model(tmp_path):
    code = "from shardserve.models.tiny import ensure_default_model as e; print(e(progress=False))"
    env = dict(os.environ, SHARDSERVE_CACHE=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=240)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [str(tmp_path / "tiny-llama-v1")] * 2
    assert is_complete_model_dir(tmp_path / "tiny-llama-v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama-v1"]
