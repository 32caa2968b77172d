"""`--model FILE.gguf` (or a directory holding one .gguf file): the config, weights, tokenizer and EOS ids of a
llama.cpp GGUF file, read through the `gguf` package.

- `gguf_config` turns the metadata into an HF-style config dict (what config.json would say);
- `iter_gguf_weights` yields (HF name, GGUFLazyTensor) pairs for the existing weight loaders, which narrow each
  one to the rank's shard before it is dequantized (models/gguf_tensors.py); llama.cpp's q/k row permutation
  (Llama and Mistral files only, as transformers' GGUF loader) is undone on the rows read;
- `load_gguf_tokenizer` / `gguf_eos_token_ids` / `is_gguf` / `find_gguf` for the engine.

`--dtype auto` resolves to float16 / bfloat16 when every matrix of the file is F16 / BF16 (or F32), else float32.
"""
from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from shardserve.layers.lazy_tensor import ReadCounter
from shardserve.models.gguf_tensors import GGUFLazyTensor, check_type, import_gguf, unpermute_rows

# GGUF general.architecture -> our class (Mistral files say "llama"; general.name tells them apart, as in
# transformers). q/k are permuted by llama.cpp only for the "llama" family.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
_PERMUTED_ARCHS = ("llama", "mistral")

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
                "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_IGNORED = ("rope_freqs.weight",)  # llama 3 rope factors: read into the config (rope_scaling), not a weight
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
# control tokens llama.cpp also treats as end-of-generation (llama-vocab.cpp's EOG list, abridged)
_EOG_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>")
_CONTROL = 3  # tokenizer.ggml.token_type of a control token


# ---- locating the file --------------------------------------------------------------------------------------

def is_gguf(path: str) -> bool:
    """Whether `path` is a .gguf file, or a directory with .gguf files and no *.safetensors (the safetensors win
    in a directory holding both)."""
    p = Path(path)
    if p.is_file():
        return p.suffix.lower() == ".gguf" or _has_magic(p)
    return p.is_dir() and any(p.glob("*.gguf")) and not any(p.glob("*.safetensors"))


def _has_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def find_gguf(path: str | os.PathLike) -> Path:
    """The one GGUF file `path` names: the file itself, or the only *.gguf in the directory."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"--model {str(path)!r}: no such file or directory")
    found = sorted(p.glob("*.gguf"))
    if len(found) != 1:
        what = "no .gguf file" if not found else f"{len(found)} .gguf files ({', '.join(f.name for f in found)})"
        raise ValueError(f"--model {str(path)!r}: the directory holds {what}; pass the .gguf file itself "
                         "(--model DIR/NAME.gguf) or a directory with exactly one")
    return found[0]


@functools.lru_cache(maxsize=4)
def _open(file: str, mtime_ns: int, size: int) -> Any:
    return import_gguf().GGUFReader(file)  # memory-maps the file: tensors are read only when sliced


def open_gguf(path: str | os.PathLike) -> Any:
    """A (cached) gguf.GGUFReader over the file `path` names."""
    f = find_gguf(path)
    st = f.stat()
    return _open(str(f.resolve()), st.st_mtime_ns, st.st_size)


def _meta(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


# ---- config -------------------------------------------------------------------------------------------------

def gguf_architecture(reader: Any) -> str:
    """The GGUF architecture as we name it ("mistral" for a llama file whose general.name says Mistral)."""
    arch = _meta(reader, "general.architecture", "")
    if arch == "llama" and "mistral" in str(_meta(reader, "general.name", "")).lower():
        return "mistral"
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return arch


def gguf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The HF-style config dict (config.json's keys) of a GGUF file; refuses unsupported archs and tensor types."""
    reader = open_gguf(path)
    arch = gguf_architecture(reader)
    key = _meta(reader, "general.architecture")

    def get(name: str, default: Any = None) -> Any:
        return _meta(reader, f"{key}.{name}", default)

    tensors = {t.name: t for t in reader.tensors}
    for t in tensors.values():
        check_type(t)
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{find_gguf(path)}: no token_embd.weight tensor")
    hidden, vocab = (int(d) for d in tensors["token_embd.weight"].shape[:2])  # ne = [hidden, vocab]
    heads = int(get("attention.head_count"))
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch,
        "hidden_size": int(get("embedding_length", hidden)), "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length") or tensors["blk.0.ffn_up.weight"].shape[1]),
        "num_attention_heads": heads, "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)), "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensors, "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensors, "torch_dtype": _auto_dtype(tensors.values()),
    }
    head_dim = get("attention.key_length") or (get("rope.dimension_count") if arch in _PERMUTED_ARCHS else None)
    if head_dim:
        cfg["head_dim"] = int(head_dim)
    window = get("attention.sliding_window")
    cfg["sliding_window"] = int(window) if window else None
    cfg["use_sliding_window"] = bool(window)
    for name, gkey in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("pad_token_id", "padding_token_id")):
        value = _meta(reader, f"tokenizer.ggml.{gkey}")
        if value is not None:
            cfg[name] = int(value)
    scaling = _rope_scaling(get, tensors, cfg)
    if scaling:
        cfg["rope_scaling"] = scaling
    return cfg


def _auto_dtype(tensors) -> str:
    """float16 / bfloat16 for a file whose matrices are all F16 / BF16 (F32 allowed), else float32."""
    kinds = {t.tensor_type.name for t in tensors if len(t.shape) >= 2} - {"F32"}
    return {frozenset({"F16"}): "float16", frozenset({"BF16"}): "bfloat16"}.get(frozenset(kinds), "float32")


def _rope_scaling(get: Callable, tensors: dict, cfg: dict) -> dict[str, Any] | None:
    kind = get("rope.scaling.type")
    if kind and kind != "none":
        out = {"rope_type": kind, "factor": float(get("rope.scaling.factor", 1.0))}
        orig = get("rope.scaling.original_context_length")
        if orig:
            out["original_max_position_embeddings"] = int(orig)
        return out  # types other than linear are refused by layers/rotary.py, naming them
    if "rope_freqs.weight" in tensors:
        import numpy as np
        factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        return _fit_llama3(factors, head_dim, cfg["rope_theta"])
    return None


def _llama3_factors(head_dim: int, theta: float, p: dict[str, Any]):
    """llama.cpp's rope_freqs for llama 3 scaling (convert_hf_to_gguf LlamaModel.generate_extra_tensors)."""
    import numpy as np
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * math.pi / inv
    old, low, high, factor = (p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"],
                              p["factor"])
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid))


def _fit_llama3(factors, head_dim: int, theta: float) -> dict[str, Any]:
    """The llama3 rope_scaling whose factors are `factors`: Llama 3.x's (low 1, high 4, 8192) if they fit, else
    low 1 and (high, original length) fitted to the interpolated band; refused when nothing reproduces them."""
    import numpy as np
    factor = float(factors.max())
    base = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    candidates = [base]
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * math.pi / inv
    band = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    if band.sum() >= 2 and factor > 1:
        smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)  # = old / ((high - 1) wavelen) - 1 / (high - 1)
        slope, icpt = np.polyfit(1 / wavelen[band], smooth, 1)
        if icpt < 0:
            high = 1 - 1 / icpt
            candidates.append({**base, "high_freq_factor": float(high),
                               "original_max_position_embeddings": int(round(slope * (high - 1)))})
    for p in candidates:
        if len(factors) == head_dim // 2 and np.allclose(_llama3_factors(head_dim, theta, p), factors, rtol=1e-4):
            return p
    raise ValueError("the GGUF's rope_freqs.weight (llama 3 rope scaling factors) matches no llama3 rope_scaling "
                     "that shardserve can reproduce")


# ---- weights ------------------------------------------------------------------------------------------------

def hf_name(gguf_name: str) -> str | None:
    """Our (HF) name of GGUF tensor `gguf_name`; None for tensors that are not weights (rope_freqs)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _IGNORED:
        return None
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in shardserve's Llama-family models")


def iter_gguf_weights(path: str | os.PathLike, hf_config: dict[str, Any], wants: Callable[[str], bool],
                      counter: ReadCounter, progress: bool = False) -> Iterator[tuple[str, GGUFLazyTensor]]:
    """Yield (HF name, GGUFLazyTensor) for every tensor `wants(name)` accepts; nothing is read until the weight
    loader calls load() on its narrowed shard."""
    from tqdm import tqdm
    reader = open_gguf(path)
    permuted = gguf_architecture(reader) in _PERMUTED_ARCHS
    heads = int(hf_config["num_attention_heads"])
    kv_heads = int(hf_config.get("num_key_value_heads") or heads)
    for t in tqdm(reader.tensors, desc="Loading GGUF weights", unit="tensor", disable=not progress, leave=False):
        name = hf_name(t.name)
        if name is None or not wants(name):
            continue
        perm = None
        if permuted and (".attn_q." in t.name or ".attn_k." in t.name):
            perm = unpermute_rows(int(t.shape[-1] if len(t.shape) == 1 else t.shape[1]),
                                  heads if ".attn_q." in t.name else kv_heads)
        yield name, GGUFLazyTensor(t, counter, perm)


# ---- tokenizer ----------------------------------------------------------------------------------------------

def load_gguf_tokenizer(path: str):
    """The transformers tokenizer stored in the GGUF (transformers converts the vocabulary), with its chat
    template."""
    from transformers import AutoTokenizer
    f = find_gguf(path)
    tok = AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
    template = _meta(open_gguf(f), "tokenizer.chat_template")
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    return tok


def gguf_eos_token_ids(path: str) -> list[int]:
    """End-of-generation ids: the EOS, EOT and EOM ids of the metadata, then the control tokens llama.cpp also
    stops on (<|eot_id|>, <|im_end|>, <|endoftext|>, ...)."""
    reader = open_gguf(path)
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = _meta(reader, f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    tokens, types = reader.fields.get("tokenizer.ggml.tokens"), reader.fields.get("tokenizer.ggml.token_type")
    if tokens is not None and types is not None:
        kinds = types.contents()
        for i, idx in enumerate(tokens.data):
            if kinds[i] == _CONTROL and bytes(tokens.parts[idx]).decode("utf-8", "replace") in _EOG_TEXTS:
                if i not in ids:
                    ids.append(i)
    return ids
