"""A model directory without a tokenizer: a clear ConfigError naming the directory and the flags (--tokenizer,
--skip-tokenizer-init), never transformers' "You need to have sentencepiece or tiktoken installed"; and with
skip_tokenizer_init the engine runs on token ids alone (one engine and data-parallel replicas), generating exactly
what the engine with a tokenizer generates, with empty text."""
from __future__ import annotations

import argparse
import json
import shutil

import pytest

from checkpoints import engine_llm, prompts_for, tokenizer_dir
from shardserve import SamplingParams
from shardserve.config import ConfigError
from shardserve.engine.args import EngineArgs
from shardserve.engine.llm_engine import load_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, seed=3, max_tokens=6, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def no_tok(checkpoint, tmp_path_factory):
    """The llama checkpoint's weights and configs, without any tokenizer file."""
    src = checkpoint("llama")
    out = tmp_path_factory.mktemp("no-tokenizer") / "llama-no-tok"
    out.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(src / name, out / name)
    for f in src.glob("*.safetensors"):
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Prompts and what the engine generates with the tokenizer present (greedy and seeded)."""
    prompts = prompts_for(1000, lengths=(3, 11, 20))
    llm = engine_llm(checkpoint("llama"))
    try:
        outs = {name: llm.generate(prompt_token_ids=prompts, sampling_params=p, use_tqdm=False)
                for name, p in (("greedy", GREEDY), ("seeded", SEEDED))}
        eos = list(llm.engine.eos_token_ids)
    finally:
        llm.shutdown()
    return prompts, outs, eos


def test_missing_tokenizer_names_the_directory_and_the_flags(no_tok):
    for make in (lambda: load_tokenizer(str(no_tok)), lambda: engine_llm(no_tok)):
        with pytest.raises(ConfigError) as e:
            make()
        msg = str(e.value)
        assert str(no_tok) in msg and "--tokenizer" in msg and "--skip-tokenizer-init" in msg, msg
        assert "has no tokenizer" in msg and "need to have sentencepiece" not in msg


def test_unloadable_tokenizer_is_a_config_error(tmp_path):
    """A tokenizer_config.json alone (no tokenizer.json): transformers' ValueError ("You need to have
    sentencepiece or tiktoken installed...") becomes a ConfigError that names the directory and the flags."""
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(ConfigError, match="--tokenizer") as e:
        load_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_tokenizer_flag_points_elsewhere(no_tok, ckpt_root, reference):
    prompts, outs, _ = reference
    llm = engine_llm(no_tok, tokenizer=str(tokenizer_dir(ckpt_root)))
    try:
        got = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in outs["greedy"]]
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in outs["greedy"]]


def test_skip_tokenizer_init_runs_on_token_ids(no_tok, reference):
    prompts, outs, eos = reference
    llm = engine_llm(no_tok, skip_tokenizer_init=True)
    try:
        assert llm.get_tokenizer() is None
        assert llm.engine.eos_token_ids == eos  # from generation_config.json / config.json
        for name, params in (("greedy", GREEDY), ("seeded", SEEDED)):
            got = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
            ref = outs[name]
            assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
            assert all(o.outputs[0].text == "" and o.outputs[0].finish_reason == "length" for o in got)
            assert [o.prompt_token_ids for o in got] == prompts
        assert [e["token_id"] for e in got[0].outputs[0].logprobs] == got[0].outputs[0].token_ids
        # stop token ids need no tokenizer: the first greedy token ends the sequence
        first = outs["greedy"][0].outputs[0].token_ids[0]
        stopped = llm.generate(prompt_token_ids=prompts[:1], sampling_params=SamplingParams(
            temperature=0, max_tokens=6, stop_token_ids=[first]), use_tqdm=False)[0].outputs[0]
        assert stopped.token_ids == [first] and stopped.finish_reason == "stop" and stopped.text == ""

        with pytest.raises(ValueError, match="prompt_token_ids.*--skip-tokenizer-init"):
            llm.generate(["Hello there"], GREEDY, use_tqdm=False)
        with pytest.raises(ValueError, match="stop_token_ids"):
            llm.generate(prompt_token_ids=prompts[:1], sampling_params=SamplingParams(max_tokens=4, stop=["x"]),
                         use_tqdm=False)
        with pytest.raises(ValueError, match="skip_tokenizer_init"):
            llm.chat([{"role": "user", "content": "hi"}])
        # the refused requests left nothing behind
        assert not llm.engine.has_unfinished_requests()
    finally:
        llm.shutdown()


def test_cli_flag():
    p = EngineArgs.add_cli_args(argparse.ArgumentParser())
    assert EngineArgs.from_cli(p.parse_args(["--skip-tokenizer-init"])).skip_tokenizer_init is True
    assert EngineArgs.from_cli(p.parse_args([])).skip_tokenizer_init is False
    assert "--skip-tokenizer-init" in p.format_help()


@pytest.mark.slow
@pytest.mark.xdist_group("multiproc")
def test_skip_tokenizer_init_with_data_parallel_replicas(no_tok, reference):
    """The driver and both engine-core processes run without a tokenizer (the directory has none)."""
    prompts, outs, _ = reference
    llm = engine_llm(no_tok, skip_tokenizer_init=True, data_parallel_size=2)
    try:
        assert llm.get_tokenizer() is None
        got = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
        with pytest.raises(ValueError, match="prompt_token_ids"):
            llm.generate(["Hello"], GREEDY, use_tqdm=False)
        assert all(k > 0 for k in llm.engine.requests_per_replica)
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in outs["greedy"]]
    assert all(o.outputs[0].text == "" for o in got)
