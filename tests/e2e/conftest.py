"""E2E fixtures: real `shardserve serve` processes on 127.0.0.1 (free ports), stopped by finalizers, and the offline
LLM on the same tiny model as the reference."""
from __future__ import annotations

import pytest

from e2e_helpers import API_KEY, ServerProcess


@pytest.fixture(scope="session")
def start_server(tiny_model, tmp_path_factory, request):
    """Factory: start_server(extra_flags) → a ready ServerProcess, stopped at the end of the session."""
    servers: list[ServerProcess] = []

    def start(extra: list[str] | None = None, wait: bool = True) -> ServerProcess:
        log = tmp_path_factory.mktemp("server") / "server.log"
        srv = ServerProcess(tiny_model, list(extra or []), log)
        servers.append(srv)
        if wait:
            srv.health_codes = srv.wait_ready()
        return srv

    def stop_all() -> None:
        for srv in servers:
            srv.stop()
    request.addfinalizer(stop_all)
    return start


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    """The main server: one replica, API key required."""
    return start_server(["--api-key", API_KEY])


@pytest.fixture(scope="session")
def offline_llm(tiny_model):
    from shardserve import LLM
    llm = LLM(model=str(tiny_model), device="cpu", kv_cache_memory="64MiB", max_model_len=512, dtype="float32",
              use_tqdm_on_load=False)
    yield llm
    llm.shutdown()


@pytest.fixture
def client(server):
    import openai
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, timeout=60, max_retries=0) as c:
        yield c
