"""Random-weight Hugging Face checkpoints built with `transformers` itself (fixed seed, save_pretrained), plus the
reference greedy generations the parity tests compare against. Nothing is downloaded."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, rms_norm_eps=1e-5)

# name -> (model_type, overrides). Awkward shapes on purpose: vocab not divisible by tp (1000 / 4 ranks pads),
# 2 KV heads (replicated at tp = 4), tied embeddings, Qwen2 q/k/v biases, Qwen3 explicit head_dim + q/k norm.
ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama3": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                         "vocab_size": 1013}),
    "mistral": ("mistral", {"sliding_window": 24}),
    "qwen2": ("qwen2", {"vocab_size": 999}),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "tied": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    # shapes that do not divide by tp (heads split by KV group, layers/tp_split.py): 7 heads each with its own KV
    # head, 7 query heads over 1 KV head, and SmolLM2's head layout (9 heads / 3 KV heads, intermediate 1536, vocab
    # 49152, tied) at a small hidden size; intermediate 101 and vocab 1001 divide by none of 2, 3, 4
    "heads7": ("llama", {"hidden_size": 56, "num_attention_heads": 7, "num_key_value_heads": 7,
                         "intermediate_size": 101, "vocab_size": 1001}),
    "heads7_mqa": ("llama", {"hidden_size": 56, "num_attention_heads": 7, "num_key_value_heads": 1,
                             "intermediate_size": 101, "vocab_size": 1001}),
    "smollm_shape": ("llama", {"hidden_size": 144, "num_attention_heads": 9, "num_key_value_heads": 3,
                               "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
                               "rope_theta": 100000.0}),
}


def tokenizer_dir(root: Path) -> Path:
    """The built-in tokenizer files (vocab 8192 > the checkpoints' vocab, so every id decodes)."""
    from shardserve.models.tiny import write_tiny_tokenizer as write_tokenizer
    out = root / "_tokenizer"
    if not (out / "tokenizer.json").exists():
        write_tokenizer(out)
    return out


def build_checkpoint(root: Path, name: str, seed: int = 0) -> Path:
    """Write `transformers` model `name` with seeded random weights to root/name (once)."""
    out = root / name
    if (out / "config.json").exists():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM
    model_type, overrides = ARCHS[name]
    kw = {**BASE, **overrides}
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # default init leaves norms at 1 and biases at 0: randomise them so they matter
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    tok = tokenizer_dir(root)
    for f in tok.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    meta = json.loads((out / "config.json").read_text())
    assert meta.get("tie_word_embeddings", False) == kw.get("tie_word_embeddings", False)
    return out


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers greedy generation, one prompt at a time (no padding), eos ignored."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
            outs.append(g[0, len(p):].tolist())
    return outs


def hf_last_logits(model_dir: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [model(torch.tensor([p])).logits[0, -1].float() for p in prompts]


def prompts_for(vocab: int, lengths=(1, 5, 17, 40), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def assert_top_logprobs_close(entry: dict, ref_logits: torch.Tensor, tol: float = 1e-4) -> None:
    """The engine's top-k logprobs equal the reference log-softmax at those ids, and they are the top k (ties
    within tol may swap places, so the check is on values, not on the order of near-equal ids)."""
    ref_lp = torch.log_softmax(ref_logits.float(), -1)
    ids = entry["top_token_ids"]
    got = torch.tensor(entry["top_logprobs"])
    assert (got - ref_lp[ids]).abs().max().item() < tol
    kth = torch.topk(ref_lp, len(ids)).values[-1]
    assert got.min().item() >= kth.item() - tol
    assert abs(entry["logprob"] - ref_lp[entry["token_id"]].item()) < tol


# Mixture-of-experts checkpoints: name -> (model_type, overrides on BASE). Expert counts divisible by 4 (ep = 4),
# Mixtral with 4 experts (one per rank at ep = 4) and a sliding window; Qwen2-MoE with a gated shared expert, q/k/v
# bias and dense layers from decoder_sparse_step = 2; Qwen3-MoE with norm_topk_prob, q/k norm and mlp_only_layers.
MOE_ARCHS: dict[str, tuple[str, dict]] = {
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2,
                            "sliding_window": 24, "vocab_size": 999}),
    "qwen2_moe": ("qwen2_moe", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "shared_expert_intermediate_size": 96, "decoder_sparse_step": 2,
                                "norm_topk_prob": False}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "head_dim": 32, "norm_topk_prob": True, "mlp_only_layers": [1],
                                "num_hidden_layers": 3, "vocab_size": 1013}),
}


def build_moe_checkpoint(root: Path, name: str, seed: int = 0) -> Path:
    """Write `transformers` MoE model `name` (MOE_ARCHS) with seeded random weights to root/name (once)."""
    out = root / name
    if not (out / "config.json").exists():
        from transformers import AutoConfig, AutoModelForCausalLM
        model_type, overrides = MOE_ARCHS[name]
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**BASE, **overrides}),
                                                 dtype=torch.float32)
        randomise_moe_weights(model)
        model.save_pretrained(out)
        for f in tokenizer_dir(root).iterdir():
            if f.is_file():
                shutil.copy(f, out / f.name)
    return out


@torch.no_grad()
def randomise_moe_weights(model: torch.nn.Module) -> None:
    """Norms and biases off their defaults (1 and 0); experts and routers larger than the default init (std 0.02),
    so the MoE output dominates the residual stream and routing has clear margins: a wrong expert, slice or
    routing weight changes the tokens."""
    for n, p in model.named_parameters():
        if n.endswith("norm.weight") or n.endswith(".bias"):
            p.add_(torch.randn_like(p) * 0.1)
        elif ".experts." in n or ".shared_expert." in n:
            p.normal_(0.0, 0.1)
        elif n.endswith("mlp.gate.weight") or n.endswith("shared_expert_gate.weight"):
            p.normal_(0.0, 0.5)


def moe_vocab(name: str) -> int:
    return MOE_ARCHS[name][1].get("vocab_size", BASE["vocab_size"])


def assert_parity(greedy, seeded, ref_tokens, ref_logits, ref_seeded) -> None:
    """Greedy tokens as transformers, first-step top-20 logprobs within 1e-4, seeded samples as tp = 1."""
    assert [o.outputs[0].token_ids for o in greedy] == ref_tokens
    for o, logits in zip(greedy, ref_logits):
        assert_top_logprobs_close(o.outputs[0].logprobs[0], logits)
    assert seeded == ref_seeded


def engine_llm(path, **kw):
    """An LLM on CPU in fp32 with a small KV cache: the settings every parity test uses."""
    from shardserve import LLM
    kw.setdefault("kv_cache_memory", "2MiB")
    kw.setdefault("dtype", "float32")
    return LLM(model=str(path), device="cpu", use_tqdm_on_load=False, **kw)


class References:
    """Per-architecture references, computed once per test module: the prompts, transformers' greedy tokens and
    last logits, and the single-device engine's seeded samples (which every layout must reproduce)."""

    def __init__(self, checkpoint, seeded, lengths, new_tokens: int = 16) -> None:
        self.checkpoint, self.seeded, self.lengths, self.new_tokens = checkpoint, seeded, lengths, new_tokens
        self.cache: dict = {}

    def __call__(self, arch: str):
        if arch not in self.cache:
            path = self.checkpoint(arch)
            vocab = ARCHS.get(arch, ("", {}))[1].get("vocab_size", 1000)
            prompts = prompts_for(vocab, lengths=self.lengths)
            single = engine_llm(path)
            outs = single.generate(prompt_token_ids=prompts, sampling_params=self.seeded, use_tqdm=False)
            single.shutdown()
            self.cache[arch] = (path, prompts, hf_greedy(path, prompts, self.new_tokens),
                                hf_last_logits(path, prompts), [o.outputs[0].token_ids for o in outs])
        return self.cache[arch]
