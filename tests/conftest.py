"""Shared fixtures: a session-wide directory of random-weight checkpoints built with transformers."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:  # Triton kernels run on CPU tensors in the interpreter where no GPU is; set before triton is first imported
    import torch
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
except ImportError:
    pass


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def checkpoint(ckpt_root):
    from checkpoints import build_checkpoint

    def make(name: str) -> Path:
        return build_checkpoint(ckpt_root, name)
    return make


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The built-in tiny Llama (random weights, real tokenizer), written to a temp dir."""
    from shardserve.models.tiny import write_tiny_model
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")
