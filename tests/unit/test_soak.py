"""`shardserve bench soak`: outcome classification, verdict and report building (no server), the /metrics and /proc
readers, and one short real soak against a `shardserve serve` subprocess on the tiny model."""
from __future__ import annotations

import argparse
import json
import os
import random

import pytest

from shardserve.bench import soak
from shardserve.bench import soak_report, soak_requests
from shardserve.bench.soak_report import RequestRecord, build_report, classify, kv_state, verdict


def rec(**kw) -> RequestRecord:
    base = dict(kind="completion", stream=True, max_tokens=8, status=200, saw_done=True, tokens=8, latency_s=0.5,
                ttft_s=0.1)
    return RequestRecord(**{**base, **kw})


@pytest.mark.parametrize("kw, outcome, reason", [
    ({}, "ok", None),
    ({"stream": False, "saw_done": False, "body_ok": True}, "ok", None),
    ({"saw_done": False, "disconnected": True, "disconnect_after": 3}, "client_disconnect", None),
    # a planned disconnect whose stream finished first is an ordinary success
    ({"disconnect_after": 50}, "ok", None),
    ({"stream": False, "saw_done": False, "disconnected": True, "disconnect_delay_s": 0.2, "status": None},
     "client_disconnect", None),
    ({"saw_done": False}, "error", "stream ended without [DONE]"),
    ({"stream": False, "saw_done": False, "body_ok": False}, "error", "response without choices"),
    ({"status": 500, "saw_done": False, "error_message": "boom"}, "error", "HTTP 500: boom"),
    ({"status": 503, "saw_done": False}, "error", "HTTP 503"),
    ({"status": 400, "saw_done": False}, "error", "HTTP 400"),
    ({"saw_done": False, "error_message": "engine died"}, "error", "error in stream: engine died"),
    # an error chunk before the planned disconnect point is still an error
    ({"saw_done": False, "error_message": "x", "disconnected": False, "disconnect_after": 9}, "error",
     "error in stream: x"),
    ({"saw_done": False, "timed_out": True}, "error", "timeout"),
    ({"saw_done": False, "timed_out": True, "disconnected": True}, "error", "timeout"),
    ({"saw_done": False, "exception": "RemoteProtocolError: peer closed"}, "error", "RemoteProtocolError: peer closed"),
    ({"status": None, "saw_done": False}, "error", "no response"),
])
def test_classify(kw, outcome, reason):
    assert classify(rec(**kw)) == (outcome, reason)


RSS_OK = {"api_server[1]": {"baseline": 300.0, "end": 350.0}, "core_proc[2]": {"baseline": 500.0, "end": 520.0}}


def test_verdict_pass():
    v = verdict({"ok": 10, "client_disconnect": 2, "error": 0}, 0, 0, RSS_OK, 100.0, 0.0,
                {"returncode": 0, "killed": False, "orphans": []})
    assert v == {"pass": True, "reasons": []}


@pytest.mark.parametrize("change, needle", [
    ({"counts": {"ok": 10, "client_disconnect": 0, "error": 1}}, "1 request error"),
    ({"counts": {"ok": 0, "client_disconnect": 0, "error": 0}}, "no request completed"),
    ({"kv_end": 3}, "KV blocks in use 3 at the end, 0 at baseline"),
    ({"kv_end": None}, "could not be read"),
    ({"rss": {"core_proc[2]": {"baseline": 500.0, "end": 601.0}}}, "core_proc[2] RSS grew 101 MB"),
    ({"rss": {"core_proc[2]": {"baseline": 500.0, "end": None}}}, "core_proc[2] is gone"),
    ({"restarts": 1.0}, "1 replica restart"),
    ({"exit": {"returncode": None, "killed": True, "timeout_s": 60, "orphans": []}}, "did not exit"),
    ({"exit": {"returncode": 1, "killed": False, "orphans": []}}, "exited with 1"),
    ({"exit": {"returncode": 0, "killed": False, "orphans": [77]}}, "child processes left"),
])
def test_verdict_fails(change, needle):
    v = verdict(change.get("counts", {"ok": 10, "client_disconnect": 0, "error": 0}), 0, change.get("kv_end", 0),
                change.get("rss", RSS_OK), 100.0, change.get("restarts", 0.0),
                change.get("exit", {"returncode": 0, "killed": False, "orphans": []}))
    assert not v["pass"]
    assert any(needle in r for r in v["reasons"]), v["reasons"]


def test_verdict_tolerance_edges():
    rss = {"p[1]": {"baseline": 100.0, "end": 200.0}}  # exactly the tolerance: still a pass
    assert verdict({"ok": 1}, 5, 5, rss, 100.0)["pass"]
    assert not verdict({"ok": 1}, 5, 5, rss, 99.0)["pass"]
    # a process that appeared during the soak (no baseline) is reported, not judged; SIGTERM's -15 is a clean exit
    assert verdict({"ok": 1}, 0, 0, {"new[9]": {"baseline": None, "end": 900.0}}, 1.0, 0.0,
                   {"returncode": -15, "killed": False, "orphans": []})["pass"]


def test_build_report():
    records = [rec(latency_s=0.1 * (i + 1), tokens=10) for i in range(10)]
    records += [rec(kind="chat", saw_done=False, disconnected=True, disconnect_after=2, tokens=2, ttft_s=0.05),
                rec(kind="chat", stream=False, saw_done=False, status=500, error_message="x", tokens=0)]
    timeline = [(float(t), {"api_server[1]": 300.0 + t, "core_proc[2]": 500.0}) for t in range(0, 101, 10)]
    rep = build_report(records, 10.0, {"api_server[1]": 300.0, "core_proc[2]": 500.0},
                       {"api_server[1]": 400.0, "core_proc[2]": 510.0},
                       {"api_server[1]": 310.0, "core_proc[2]": 505.0}, 0, 0, 100.0, timeline,
                       extra={"model": "m"})
    assert rep["model"] == "m"
    assert rep["requests"] == {"total": 12, "ok": 10, "client_disconnect": 1, "error": 1, "disconnects_planned": 1}
    assert rep["requests_by_kind"]["chat/full"] == {"ok": 0, "client_disconnect": 0, "error": 1}
    assert rep["errors"] == {"HTTP 500: x": 1}
    assert rep["tokens_generated"] == 102  # ok and disconnected requests count, errors do not
    assert rep["throughput"] == {"requests_per_s": 1.2, "ok_requests_per_s": 1.0, "tokens_per_s": 10.2}
    assert rep["latency_ms"]["p50"] == pytest.approx(500.0) and rep["latency_ms"]["p99"] == pytest.approx(1000.0)
    assert rep["ttft_ms"]["p50"] == pytest.approx(100.0)
    api = rep["rss_mb"]["api_server[1]"]
    assert api["baseline"] == 300.0 and api["peak"] == 400.0 and api["end"] == 310.0 and api["delta"] == 10.0
    assert api["slope_mb_per_min"] == pytest.approx(60.0)  # 1 MB/s in the timeline
    assert rep["rss_mb"]["core_proc[2]"]["slope_mb_per_min"] == pytest.approx(0.0)
    assert rep["kv_blocks_in_use"] == {"baseline": 0, "end": 0}
    assert rep["verdict"] == {"pass": False, "reasons": ["1 request error(s)"]}
    json.dumps(rep)  # the report is plain JSON
    text = soak_report.format_report(rep)
    assert "FAIL: 1 request error(s)" in text and "api_server[1]" in text


METRICS = """# HELP shardserve:kv_cache_free_blocks KV-cache blocks free or evictable.
# TYPE shardserve:kv_cache_free_blocks gauge
shardserve:kv_cache_free_blocks{model_name="m",replica="0"} 90.0
shardserve:kv_cache_free_blocks{model_name="m",replica="1"} 100.0
shardserve:kv_cache_usage_perc{model_name="m",replica="0"} 0.1
shardserve:kv_cache_usage_perc{model_name="m",replica="1"} 0.0
shardserve:num_requests_running{model_name="m",replica="0"} 2.0
shardserve:num_requests_waiting{model_name="m",replica="1"} 1.0
shardserve:replica_restarts_total{model_name="m",replica="1"} 1.0
"""


def test_kv_state():
    kv = kv_state(METRICS)
    assert kv["replicas"]["0"]["in_use"] == 10 and kv["replicas"]["1"]["in_use"] == 0
    assert kv["in_use"] == 10 and kv["running"] == 2 and kv["waiting"] == 1 and kv["restarts"] == 1
    full = kv_state('shardserve:kv_cache_free_blocks{replica="0"} 0\nshardserve:kv_cache_usage_perc{replica="0"} 1\n')
    assert full["in_use"] is None  # total unknown while every block is held
    assert kv_state("")["in_use"] is None


def test_sample_rss_sees_this_process_and_its_children():
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        rss = soak_report.sample_rss(os.getpid())
        labels = list(rss)
        assert labels[0] == f"api_server[{os.getpid()}]" and rss[labels[0]] > 10
        assert any(lab.endswith(f"[{child.pid}]") for lab in labels)
    finally:
        child.kill()
        child.wait()


def test_request_mix_fits_the_context():
    args = argparse.Namespace(max_tokens="1:128", prompt_words="1:400", disconnect_fraction=0.3)
    rng = random.Random(0)
    plans = [soak_requests.make_request(rng, args, 256) for _ in range(400)]
    for r, body in plans:
        words = len((body.get("prompt") or body["messages"][-1]["content"]).split())
        assert words * soak_requests.TOKENS_PER_WORD + body["max_tokens"] + soak_requests.TEMPLATE_MARGIN_TOKENS <= 256
        assert body["stream"] == r.stream
        if r.disconnect_after is not None or r.disconnect_delay_s is not None:
            assert body["ignore_eos"]
    kinds = {(r.kind, r.stream) for r, _ in plans}
    assert kinds == {("completion", True), ("completion", False), ("chat", True), ("chat", False)}
    assert 0.2 < sum(r.disconnect_after is not None or r.disconnect_delay_s is not None for r, _ in plans) / 400 < 0.4


@pytest.mark.slow
@pytest.mark.xdist_group("multiproc")
def test_short_real_soak_passes(tiny_model, tmp_path, capsys):
    p = argparse.ArgumentParser()
    soak.add_args(p)
    out = tmp_path / "soak.json"
    args = p.parse_args(["--model", str(tiny_model), "--device", "cpu", "--kv-cache-memory", "64MiB",
                         "--max-model-len", "512", "--duration-s", "8", "--concurrency", "2",
                         "--disconnect-fraction", "0.4", "--warmup-requests", "2", "--max-tokens", "1:48",
                         "--prompt-words", "1:100", "--server-log", str(tmp_path / "server.log"),
                         "--out", str(out)])
    code = soak.run(args)
    rep = json.loads(out.read_text())
    assert code == 0, (rep["verdict"], (tmp_path / "server.log").read_text()[-3000:])
    assert rep["verdict"] == {"pass": True, "reasons": []}
    assert rep["requests"]["error"] == 0 and rep["requests"]["ok"] > 0
    assert rep["requests"]["client_disconnect"] > 0
    assert rep["kv_blocks_in_use"]["baseline"] == rep["kv_blocks_in_use"]["end"] == 0
    assert rep["tokens_generated"] > 0 and rep["latency_ms"]["p99"] >= rep["latency_ms"]["p50"] > 0
    assert any(k.startswith("api_server[") for k in rep["rss_mb"])
    assert any(k.startswith("core_proc[") for k in rep["rss_mb"])
    assert rep["server_exit"]["returncode"] in (0, -15) and not rep["server_exit"]["orphans"]
    assert "verdict: PASS" in capsys.readouterr().out
