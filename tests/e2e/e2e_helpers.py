"""Helpers of the e2e tests: a `shardserve serve` subprocess on a free loopback port, and reading /metrics."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from shardserve.utils.network import get_free_port

API_KEY = "test-key-123"
MODEL_NAME = "tiny"
# float32, not auto (bf16 on CPUs with native bf16): the tests compare tokens exactly across different batchings
# (replicas, offline runs), and bf16 GEMVs round in a batch-size-dependent order (AMX for 3-64 rows, AVX-512 below)
ENGINE_FLAGS = ["--device", "cpu", "--kv-cache-memory", "64MiB", "--max-model-len", "512", "--dtype", "float32"]
START_TIMEOUT_S = 120.0


class ServerProcess:
    """`python -m shardserve.entrypoints.cli serve ...` in a subprocess, its output in a log file."""

    def __init__(self, model: Path | None, extra: list[str], log_path: Path) -> None:
        """model None: the built-in model (no --model flag)."""
        self.port = get_free_port("127.0.0.1")
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "shardserve.entrypoints.cli", "--log-level", "WARNING", "serve",
               *(["--model", str(model)] if model is not None else []), "--host", "127.0.0.1", "--port", str(self.port),
               "--served-model-name", MODEL_NAME, "--stats-interval", "0", *ENGINE_FLAGS, *extra]
        self._log = open(log_path, "wb")
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.health_codes: list[int] = []

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=5)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> list[int]:
        """Wait for /health 200 with every replica up (the server answers as soon as one is, and routes to the
        ones that are); returns the status codes seen on the way (503 while loading)."""
        seen: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                resp = self.health()
                seen.append(resp.status_code)
                if resp.status_code == 200 and all(r["healthy"] for r in resp.json()["replicas"]):
                    return seen
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready within {timeout:.0f} s:\n{self.log_tail()}")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
