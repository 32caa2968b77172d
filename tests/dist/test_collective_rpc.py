"""Executor.collective_rpc: a named worker method (or "module:function") on every rank or some, results in rank order;
a rank that raises fails the call naming the rank and its exception, a rank that stalls fails it within the timeout.
In process (uni) and on 2 and 4 CPU rank processes (mp: tp 2, and tp 2 x pp 2)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from checkpoints import engine_llm
from shardserve.executor.base import ExecutorError

TESTS = str(Path(__file__).resolve().parents[1])

LAYOUTS = {"uni": {}, "2ranks": {"tensor_parallel_size": 2},
           "4ranks": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}}


@pytest.fixture(params=list(LAYOUTS))
def executor(request, checkpoint, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))  # rank processes
    llm = engine_llm(checkpoint("llama"), **LAYOUTS[request.param])
    yield llm.engine.executor
    llm.shutdown()


def test_results_in_rank_order(executor):
    world = executor.world_size
    who = executor.collective_rpc("rpc_helpers:whoami")
    assert [w["rank"] for w in who] == list(range(world))
    tp = executor.cfg.parallel.tensor_parallel_size
    assert [(w["stage"], w["tp"]) for w in who] == [(r // tp, r % tp) for r in range(world)]
    assert [w["rank"] for w in executor.collective_rpc("rpc_helpers:whoami", ranks=[world - 1, 0])] == \
        sorted({0, world - 1})
    assert executor.collective_rpc("rpc_helpers:whoami", ranks=[]) == []
    # a Worker method: every rank agreed on the KV cache size at start-up through collective_rpc
    assert executor.collective_rpc("kv_block_bytes")[0] == executor.block_bytes
    assert all(i["bytes_read"] > 0 for i in executor.collective_rpc("load_info"))


def test_a_rank_that_raises_fails_the_call_naming_it(executor):
    bad = executor.world_size - 1
    with pytest.raises(ExecutorError, match=f"rank {bad} failed with RuntimeError: boom on rank {bad}"):
        executor.collective_rpc("rpc_helpers:fail_on", bad)
    with pytest.raises(ExecutorError, match="no public method '_dummy_forward'"):
        executor.collective_rpc("_dummy_forward", 1)
    # the rank survives a failed call: the next one works and does not see stale replies
    assert [w["rank"] for w in executor.collective_rpc("rpc_helpers:whoami")] == list(range(executor.world_size))


def test_a_rank_that_stalls_fails_the_call_within_its_timeout(executor):
    bad = executor.world_size - 1
    t0 = time.monotonic()
    with pytest.raises(ExecutorError, match=f"rank {bad} did not answer"):
        executor.collective_rpc("rpc_helpers:stall_on", bad, 30.0, timeout=1.5)
    assert time.monotonic() - t0 < 5.0
    with pytest.raises(ExecutorError):  # its state is no longer trusted: the executor refuses further work
        executor.collective_rpc("rpc_helpers:whoami")


def test_unknown_ranks_are_refused(executor):
    with pytest.raises(ExecutorError, match="do not exist"):
        executor.collective_rpc("rpc_helpers:whoami", ranks=[executor.world_size])
