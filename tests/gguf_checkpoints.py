"""GGUF files written with the `gguf` package's writer from the random transformers checkpoints (tests/checkpoints.py),
as llama.cpp's convert_hf_to_gguf.py writes them: llama.cpp tensor names, q/k rows permuted for the llama family,
matrices in the requested type (quantized with gguf.quants.quantize; the K-quants, which gguf cannot quantize in
Python, get random but valid blocks), norms and biases in F32. Nothing is downloaded."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

# HF model_type -> GGUF general.architecture (Mistral files are "llama" files named Mistral)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# K-quant block layout: the byte offsets of the fp16 scale fields in each block (all other bytes are free)
K_QUANT_F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")  # model.layers.N.<module...>.weight|bias
    return f"blk.{parts[2]}.{_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """[rows, bytes] of random K-quant blocks whose fp16 scales are small finite numbers."""
    import gguf
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    blocks = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for off in K_QUANT_F16_FIELDS[qtype]:
        scale = rng.uniform(1e-4, 2e-3, size=len(blocks)).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def encode(arr: np.ndarray, qtype: str, rng: np.random.Generator) -> tuple[np.ndarray, object]:
    """(array to hand to GGUFWriter.add_tensor, raw_dtype) for `arr` stored as `qtype`."""
    import gguf
    t = gguf.GGMLQuantizationType[qtype]
    if qtype in ("F32", "F16"):
        return gguf.quants.quantize(arr, t), None
    if qtype in K_QUANT_F16_FIELDS:
        return random_k_blocks(arr.shape[0], arr.shape[1], qtype, rng), t
    return gguf.quants.quantize(arr, t), t


def llama3_rope_freqs(cfg: dict) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: the llama 3 rope factors."""
    rs, head_dim = cfg["rope_scaling"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    out = []
    for freq in 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(hf_dir: Path, out: Path, qtype: str = "F32", seed: int = 0, name: str | None = None,
               arch: str | None = None, extra=None) -> Path:
    """Write the transformers checkpoint in hf_dir as a GGUF file `out` whose matrices are `qtype` (once)."""
    import gguf
    import torch
    from safetensors.torch import load_file
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((hf_dir / "config.json").read_text())
    state = {k: v.to(torch.float32).numpy() for f in sorted(hf_dir.glob("*.safetensors"))
             for k, v in load_file(f).items()}
    model_type = cfg["model_type"]
    arch = arch or GGUF_ARCH[model_type]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(name or f"{model_type}-test")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if cfg.get("sliding_window") and model_type == "mistral":
        w.add_sliding_window(cfg["sliding_window"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    if extra:
        extra(w)
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs({**cfg, "rope_scaling": rope}))
    for hf, arr in state.items():
        if hf == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        g = gguf_name(hf)
        if arch == "llama" and (".attn_q." in g or ".attn_k." in g):
            arr = llama_permute(arr, heads if ".attn_q." in g else kv)
        if arr.ndim == 1:
            w.add_tensor(g, arr.astype(np.float32))
        else:
            data, raw = encode(np.ascontiguousarray(arr), qtype, rng)
            w.add_tensor(g, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def hf_gguf_model(path: Path):
    """transformers' own load of the GGUF file in float32 (the benchmarks' peer loader)."""
    from shardserve.bench.hf_peer import hf_model_from_gguf
    return hf_model_from_gguf(path)
