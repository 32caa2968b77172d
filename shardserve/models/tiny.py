"""The built-in model: a deterministic random-weight tiny Llama plus a trained BPE tokenizer, as an HF directory."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from shardserve.models.tokenizer_corpus import training_texts

TINY_MODEL_NAME = "shardserve-tiny-llama"
# Bump the suffix whenever the weights, the tokenizer or the corpus change: caches are keyed by it.
CACHE_SUBDIR = "tiny-llama-v1"

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)  # ids 0..4, in this order
BOS_ID, EOS_ID, PAD_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))
VOCAB_SIZE = 8192
MAX_LEN = 2048

# Llama 3's pre-tokenizer split: letters with one leading non-letter, digits in groups of up to three, ...
_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# ChatML, with BOS first (so apply_chat_template(tokenize=True), which adds no special tokens, starts with BOS).
# `content` may be a string or a list of OpenAI-style parts, of which the text parts are used.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json")


def tiny_model_config() -> dict[str, Any]:
    """config.json of the built-in model (readable by transformers v4 and v5: both rope styles are present)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_LEN,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def tiny_weight_specs(config: dict[str, Any] | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes, in the fixed order in which their values are drawn."""
    c = config or tiny_model_config()
    h, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q_out, kv_out = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (h,)),
                  (p + "self_attn.q_proj.weight", (q_out, h)),
                  (p + "self_attn.k_proj.weight", (kv_out, h)),
                  (p + "self_attn.v_proj.weight", (kv_out, h)),
                  (p + "self_attn.o_proj.weight", (h, q_out)),
                  (p + "post_attention_layernorm.weight", (h,)),
                  (p + "mlp.gate_proj.weight", (inter, h)),
                  (p + "mlp.up_proj.weight", (inter, h)),
                  (p + "mlp.down_proj.weight", (h, inter))]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]
    return specs


def generate_tiny_weights(seed: int = 0, config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """float32 weights: ones for norms, normal(0, 0.02) for everything else, from one seeded CPU generator.

    Values are drawn in float64 and rounded to float32: torch's float32 normal_ takes a SIMD path whose
    last bit differs between CPUs (AVX2 vs. not), while its float64 path is the same everywhere.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in tiny_weight_specs(config):
        if len(shape) == 1:  # RMSNorm scale
            out[name] = torch.ones(shape, dtype=torch.float32)
        else:
            w = torch.empty(shape, dtype=torch.float64).normal_(0.0, 0.02, generator=gen)
            out[name] = w.to(torch.float32)
    return out


@contextlib.contextmanager
def _tokenizers_single_threaded() -> Iterator[None]:
    """Train without rayon threads: no fork-after-parallelism warning later, and nothing left to chance."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def build_tiny_tokenizer() -> Tokenizer:
    """Train the byte-level BPE tokenizer (8192 entries, specials at ids 0..4) on the embedded corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    with _tokenizers_single_threaded():
        tok.train_from_iterator(training_texts(), trainer=trainer)
    if tok.get_vocab_size() > VOCAB_SIZE or [tok.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(5)):
        raise RuntimeError("tiny tokenizer training produced an unexpected vocabulary")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
                                      special_tokens=[(BOS_TOKEN, BOS_ID)]),
    ])
    return tok


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IM_START, IM_END],
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": MAX_LEN,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }


def _readme(seed: int) -> str:
    n_params = sum(math.prod(s) for _, s in tiny_weight_specs())
    return (f"# {TINY_MODEL_NAME}\n\n"
            f"shardserve's built-in model, written by `shardserve.models.tiny.write_tiny_model(seed={seed})`.\n\n"
            "**The weights are random** (normal(0, 0.02), from a seeded generator), so the model generates "
            "noise, not language. It exists so that every code path can be run and compared with Hugging Face "
            "`transformers` without downloading anything.\n\n"
            f"- architecture: LlamaForCausalLM, hidden 512, 8 layers, 8 heads / 4 KV heads, vocab {VOCAB_SIZE}, "
            f"{n_params:,} parameters, float32\n"
            "- tokenizer: byte-level BPE trained on a small embedded English corpus; BOS is prepended; "
            "ChatML chat template (`<|im_start|>` / `<|im_end|>`)\n")


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tiny_tokenizer(out_dir: str | Path) -> Path:
    """Write only the tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer().save(str(out / "tokenizer.json"), pretty=True)
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    _write_json(out / "special_tokens_map.json", {
        "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IM_START, IM_END]})
    return out


def write_tiny_model(out_dir: str | Path, seed: int = 0, progress: bool = False) -> Path:
    """Write the complete model directory (config, weights, tokenizer, README) to `out_dir`; return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    config = tiny_model_config()
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, IM_END_ID],  # <|im_end|> ends a chat turn
        "pad_token_id": PAD_ID,
    })
    write_tiny_tokenizer(out)
    save_file(generate_tiny_weights(seed, config), str(out / "model.safetensors"),
              metadata={"format": "pt", "shardserve_tiny_seed": str(seed)})
    os.chmod(out / "model.safetensors", 0o644)  # safetensors creates it owner-only
    (out / "README.md").write_text(_readme(seed), encoding="utf-8")
    if progress:
        print(f"shardserve: wrote the built-in tiny model ({TINY_MODEL_NAME}, random weights) to {out} "
              f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return out


def default_model_dir() -> Path:
    """$SHARDSERVE_CACHE, else $XDG_CACHE_HOME/shardserve, else ~/.cache/shardserve; then /tiny-llama-v1."""
    root = os.environ.get("SHARDSERVE_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "shardserve") if xdg else str(Path.home() / ".cache" / "shardserve")
    return Path(root).expanduser() / CACHE_SUBDIR


def is_complete_model_dir(path: str | Path) -> bool:
    """True when every file of the model directory is present and non-empty."""
    p = Path(path)
    return all((p / f).is_file() and (p / f).stat().st_size > 0 for f in _REQUIRED_FILES)


def ensure_default_model(progress: bool = True) -> Path:
    """Return the built-in model's directory, writing it first if absent.

    The model is built in a temporary sibling directory and moved into place with one os.rename, so readers
    never see a half-written directory; when processes race, the first rename wins and the others discard
    their copy (the copies are identical).
    """
    final = default_model_dir()
    if is_complete_model_dir(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"shardserve: writing the built-in tiny model ({TINY_MODEL_NAME}, RANDOM weights) to {final} "
              "(once; a few seconds)", file=sys.stderr)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model is a cache others may read
    try:
        write_tiny_model(tmp)
        for _ in range(3):
            try:
                os.rename(tmp, final)
                break
            except OSError:
                if is_complete_model_dir(final):
                    break  # another process won the race
                if final.exists():  # broken (an interrupted non-atomic writer, or edited by hand): set it aside
                    stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale-", dir=final.parent))
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(final, stale / final.name)
                    shutil.rmtree(stale, ignore_errors=True)
        else:
            raise OSError(f"could not move the built-in model into place at {final}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"shardserve: built-in tiny model ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return final
