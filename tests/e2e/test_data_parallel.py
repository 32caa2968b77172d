"""-dp 2: load reaches both replicas; killing or stopping one under streaming load loses no request (they migrate
to the survivor and their text equals an unkilled run), new requests go to the survivor, and the dead replica is back
within 60 s (with --max-migrations 0 its requests fail cleanly instead: tests/dist/test_liveness.py). Offline
LLM(data_parallel_size=2) matches one engine."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import openai
import pytest

from e2e_helpers import MODEL_NAME, metric_value
from shardserve import LLM, SamplingParams
from shardserve.bench.soak_report import proc_children

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiproc")]


@pytest.fixture(scope="module")
def dp_server(start_server):
    return start_server(["-dp", "2"])


def client(srv) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="unused", timeout=120, max_retries=0)


def successes(srv, replica: int) -> float:
    return metric_value(srv.metrics(), "shardserve:request_success_total", replica=str(replica))


def test_load_reaches_both_replicas_and_matches_offline(dp_server, offline_llm):
    prompts = [f"Data parallel prompt {i}" for i in range(8)]
    ref = [o.outputs[0].text for o in offline_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8),
                                                           use_tqdm=False)]

    async def main():
        async with client(dp_server) as c:
            return await asyncio.gather(*(c.completions.create(model=MODEL_NAME, prompt=p, max_tokens=8,
                                                               temperature=0) for p in prompts))
    results = asyncio.run(main())
    assert [r.choices[0].text for r in results] == ref  # the same tokens whichever replica served them
    per_replica = [successes(dp_server, 0), successes(dp_server, 1)]
    assert min(per_replica) >= 2, per_replica  # least-loaded routing spreads 8 concurrent requests
    text = dp_server.metrics()
    assert 'replica="0"' in text and 'replica="1"' in text
    assert metric_value(text, "shardserve:generation_tokens_total", replica="1") > 0


SEEDED = {"temperature": 0.9, "seed": 1234, "top_p": 0.95}


async def stream_req(c: openai.AsyncOpenAI, prompt: str, max_tokens: int, seeded: bool) -> tuple[str, int]:
    kw = dict(SEEDED) if seeded else {"temperature": 0}
    seed = kw.pop("seed", None)
    stream = await c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, stream=True,
                                        seed=seed, extra_body={"ignore_eos": True},
                                        stream_options={"include_usage": True}, **kw)
    text, tokens = "", 0
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return text, tokens


def wait_victim_busy(srv, replica: int) -> dict:
    """Until `replica` is generating (only its state matters: the other one may still be prefilling, or done)."""
    deadline, victim = time.monotonic() + 30, {}
    while time.monotonic() < deadline:
        victim = srv.health().json()["replicas"][replica]
        if victim["in_flight"] > 0 and victim["waiting"] == 0:
            return victim
        time.sleep(0.05)
    raise AssertionError(f"replica {replica} never had a request in flight: {victim}")


def wait_restarted(srv, replica: int, old_pid: int) -> dict:
    deadline, rep = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        rep = srv.health().json()["replicas"][replica]
        if rep["healthy"] and rep["pid"] != old_pid:
            return rep
        time.sleep(0.25)
    raise AssertionError(f"replica {replica} did not come back within 60 s: {rep}")


def test_a_killed_then_a_stopped_replica_lose_no_request(start_server, offline_llm):
    """kill -9 one replica's core, then (once it is back) SIGSTOP the other's, each under streaming load (greedy and
    seeded): the requests of the lost replica migrate to the survivor, re-prefilled with the tokens already sent, and
    every stream equals an unkilled run, character for character; no client sees an error. The replica comes back
    and serves again."""
    srv = start_server(["-dp", "2", "--engine-heartbeat-timeout", "3"])
    n, max_tokens = 4, 128
    prompts = [f"Migration test {i}" for i in range(n)]
    seeded = [i % 2 == 1 for i in range(n)]
    ref = {}
    for s in (False, True):  # one batch per kind: the tokens do not depend on the batch
        kw = dict(SEEDED) if s else {"temperature": 0}
        mine = [p for p, k in zip(prompts, seeded) if k == s]
        outs = offline_llm.generate(mine, SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw), use_tqdm=False)
        ref.update({p: o.outputs[0].text for p, o in zip(mine, outs)})

    def fault(victim: int, how: str) -> None:
        victim_pid = srv.health().json()["replicas"][victim]["pid"]
        migrated_before = metric_value(srv.metrics(), "shardserve:request_migrations_total", replica=str(victim))

        async def main():
            async with client(srv) as c:
                tasks = [asyncio.create_task(stream_req(c, p, max_tokens, s)) for p, s in zip(prompts, seeded)]
                busy = await asyncio.to_thread(wait_victim_busy, srv, victim)
                os.kill(victim_pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
                try:
                    after = await stream_req(c, "sent after the fault", 5, False)  # served by the survivor
                    return busy, await asyncio.gather(*tasks, return_exceptions=True), after
                finally:
                    if how == "stop":
                        try:
                            os.kill(victim_pid, signal.SIGCONT)
                        except ProcessLookupError:
                            pass

        busy, results, after = asyncio.run(main())
        assert after[1] == 5
        errors = [repr(r)[:200] for r in results if isinstance(r, BaseException)]
        assert not errors, (how, errors, srv.log_tail())
        # nothing repeated, nothing missing, seeded draws go on where they were
        assert [t for t, _ in results] == [ref[p] for p in prompts], how
        assert all(k == max_tokens for _, k in results)
        text = srv.metrics()
        migrated = metric_value(text, "shardserve:request_migrations_total", replica=str(victim)) - migrated_before
        assert 1 <= migrated <= busy["in_flight"], (how, migrated, busy)
        assert metric_value(text, "shardserve:request_failure_total", replica=str(victim)) == 0
        assert wait_restarted(srv, victim, victim_pid)["restarts"] == 1

    fault(1, "kill")
    fault(0, "stop")

    async def again():
        async with client(srv) as c:
            return await asyncio.gather(*(stream_req(c, f"after restart {i}", 6, False) for i in range(4)))
    assert all(tokens == 6 for _, tokens in asyncio.run(again()))


def rank_pids(core: int) -> list[int]:
    """The rank processes (`python -m shardserve.worker.main`) a core started."""
    out = []
    for pid in proc_children().get(core, []):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"shardserve.worker.main" in f.read():
                    out.append(pid)
        except OSError:
            continue
    return sorted(out)


def test_a_lost_rank_s_requests_migrate(start_server):
    """-dp 2 -tp 2: kill -9 one rank of replica 1, then SIGSTOP one rank of replica 0, each under streaming load: the
    replica's core reports its engine dead (a lost rank) or its stall check fires (--rank-stall-timeout-s), and its
    requests go on on the other replica; every stream equals the unkilled run."""
    srv = start_server(["-dp", "2", "-tp", "2", "--rank-stall-timeout-s", "3"])
    n, max_tokens = 4, 64
    prompts = [f"Rank loss {i}" for i in range(n)]
    seeded = [i % 2 == 1 for i in range(n)]

    async def run_all(fault=None):
        async with client(srv) as c:
            tasks = [asyncio.create_task(stream_req(c, p, max_tokens, s)) for p, s in zip(prompts, seeded)]
            if fault is not None:
                await asyncio.to_thread(fault)
            return await asyncio.gather(*tasks, return_exceptions=True)

    ref = asyncio.run(run_all())
    assert all(not isinstance(r, BaseException) for r in ref), ref

    def hit(replica: int, sig: int) -> tuple[int, list[int]]:
        core = srv.health().json()["replicas"][replica]["pid"]
        ranks = rank_pids(core)
        assert len(ranks) == 2, (core, ranks)
        wait_victim_busy(srv, replica)
        os.kill(ranks[1], sig)
        return core, ranks

    for replica, sig in ((1, signal.SIGKILL), (0, signal.SIGSTOP)):
        hits: list = []
        try:
            results = asyncio.run(run_all(lambda: hits.append(hit(replica, sig))))
        finally:
            if sig == signal.SIGSTOP and hits:
                try:
                    os.kill(hits[0][1][1], signal.SIGCONT)
                except ProcessLookupError:
                    pass
        errors = [repr(r)[:200] for r in results if isinstance(r, BaseException)]
        assert not errors, (sig, errors, srv.log_tail())
        assert results == ref, sig
        text = srv.metrics()
        assert metric_value(text, "shardserve:request_migrations_total", replica=str(replica)) >= 1
        assert metric_value(text, "shardserve:request_failure_total", replica=str(replica)) == 0
        if replica == 1:  # the next fault needs it back to take replica 0's requests
            wait_restarted(srv, replica, hits[0][0])


def test_offline_data_parallel_matches_one_engine(tiny_model, offline_llm):
    prompts = [f"Offline prompt {i} reads" for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=8),
              SamplingParams(temperature=0.8, seed=3, max_tokens=8, n=2)]
    refs = [offline_llm.generate(prompts, p, use_tqdm=False) for p in params]
    llm = LLM(model=str(tiny_model), device="cpu", kv_cache_memory="64MiB", max_model_len=512, dtype="float32",
              data_parallel_size=2, use_tqdm_on_load=False)
    procs = [c.proc for c in llm.engine.cores]
    try:
        for p, ref in zip(params, refs):
            got = llm.generate(prompts, p, use_tqdm=False)
            assert [[o.token_ids for o in r.outputs] for r in got] == [[o.token_ids for o in r.outputs] for r in ref]
            assert [[o.text for o in r.outputs] for r in got] == [[o.text for o in r.outputs] for r in ref]
        assert all(k > 0 for k in llm.engine.requests_per_replica)  # both replicas got work
        assert llm.engine.cfg.model.max_model_len == 512
        with pytest.raises(ValueError, match="context length"):
            llm.generate(["word " * 600], params[0], use_tqdm=False)
    finally:
        llm.shutdown()
    assert all(p.poll() is not None for p in procs)  # the engine-core processes are gone
