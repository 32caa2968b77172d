"""Server metrics: per-server registries, vLLM-style names with a replica label, counters that stay monotonic when a
replica restarts, and the periodic stats line."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from shardserve.metrics import ServerMetrics, StatsLogger


def samples(m: ServerMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
    return out


def test_two_servers_do_not_collide():
    a, b = ServerMetrics("m"), ServerMetrics("m")  # the global registry would raise "Duplicated timeseries"
    a.on_request_accepted(0, 5)
    assert samples(a)[("shardserve:prompt_tokens_total", (("replica", "0"),))] == 5
    assert ("shardserve:prompt_tokens_total", (("replica", "0"),)) not in samples(b)


def test_hooks_and_names():
    m = ServerMetrics("tiny")
    m.on_replica_up(0)
    m.on_replica_up(1)
    m.on_core_stats(1, {"num_requests_running": 3, "num_requests_waiting": 2, "kv_cache_usage_perc": 0.25,
                        "num_preemptions": 4, "num_free_blocks": 30})
    m.on_request_accepted(1, 10)
    m.on_first_token(1, 0.05)
    m.on_inter_token(1, 0.01)
    m.on_generation_tokens(1, 7)
    m.on_request_finished(1, "length", 0.5)
    m.on_request_finished(1, "abort", 0.2)
    m.on_request_finished(0, "error", 0.1)
    s = samples(m)
    r1 = (("replica", "1"),)
    assert s[("shardserve:num_requests_running", r1)] == 3
    assert s[("shardserve:num_requests_waiting", r1)] == 2
    assert s[("shardserve:kv_cache_usage_perc", r1)] == 0.25
    assert s[("shardserve:kv_cache_free_blocks", r1)] == 30
    assert s[("shardserve:num_preemptions_total", r1)] == 4
    assert s[("shardserve:prompt_tokens_total", r1)] == 10
    assert s[("shardserve:generation_tokens_total", r1)] == 7
    assert s[("shardserve:request_success_total", (("finished_reason", "length"), ("replica", "1")))] == 1
    assert s[("shardserve:request_success_total", (("finished_reason", "abort"), ("replica", "1")))] == 1
    assert s[("shardserve:request_failure_total", (("replica", "0"),))] == 1
    assert s[("shardserve:time_to_first_token_seconds_count", r1)] == 1
    assert s[("shardserve:inter_token_latency_seconds_count", r1)] == 1
    assert s[("shardserve:e2e_request_latency_seconds_count", r1)] == 2
    assert s[("shardserve:replica_healthy", r1)] == 1


def test_counters_survive_a_replica_restart():
    m = ServerMetrics("tiny")
    m.on_replica_up(0)
    m.on_core_stats(0, {"num_preemptions": 5, "num_requests_running": 2})
    m.on_replica_down(0)
    s = samples(m)
    assert s[("shardserve:replica_healthy", (("replica", "0"),))] == 0
    assert s[("shardserve:num_requests_running", (("replica", "0"),))] == 0  # a dead replica runs nothing
    m.on_replica_restart(0)
    m.on_replica_up(0)  # the new core counts preemptions from zero again
    m.on_core_stats(0, {"num_preemptions": 2})
    s = samples(m)
    assert s[("shardserve:num_preemptions_total", (("replica", "0"),))] == 7
    assert s[("shardserve:replica_restarts_total", (("replica", "0"),))] == 1


def test_stats_logger_line():
    m = ServerMetrics("tiny")
    log = StatsLogger(m, interval=10.0)
    m.on_request_accepted(0, 100)
    m.on_generation_tokens(0, 50)
    m.on_core_stats(0, {"num_requests_running": 4, "num_requests_waiting": 1, "kv_cache_usage_perc": 0.125})
    first = log.lines(now=100.0)
    assert first == ["replica 0: prompt throughput 10.0 tok/s, generation throughput 5.0 tok/s, running 4 reqs, "
                     "waiting 1 reqs, KV cache usage 12.5%"]
    m.on_generation_tokens(0, 20)
    assert "generation throughput 4.0 tok/s" in log.lines(now=105.0)[0]  # rate since the previous line


def test_moe_expert_counts_from_a_real_engine_reach_the_gauge(ckpt_root):
    """A Mixtral engine's per-expert counts (sum = tokens × top_k per layer) flow through the core-process stats
    into shardserve:moe_expert_tokens{layer, expert}."""
    from checkpoints import MOE_ARCHS, build_moe_checkpoint, engine_llm
    from shardserve import SamplingParams
    from shardserve.engine.core_proc import _stats
    arch = "mixtral" if "mixtral" in MOE_ARCHS else sorted(MOE_ARCHS)[0]
    llm = engine_llm(build_moe_checkpoint(ckpt_root, arch))
    llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(max_tokens=3, ignore_eos=True),
                 use_tqdm=False)
    stats = _stats(llm.engine)
    llm.shutdown()
    top_k = MOE_ARCHS[arch][1]["num_experts_per_tok"]
    assert stats["expert_counts"] and all(sum(c) == (4 + 2) * top_k for _, c in stats["expert_counts"])
    m = ServerMetrics("moe")
    m.on_core_stats(0, stats)
    got = samples(m)
    layer, counts = stats["expert_counts"][0]
    for e, n in enumerate(counts):
        assert got[("shardserve:moe_expert_tokens", (("expert", str(e)), ("layer", str(layer)), ("replica", "0")))] == n
