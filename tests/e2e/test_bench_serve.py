"""`shardserve bench serve` against the real server: every request completes with its exact output length, the
JSON has the reported fields, and (where matplotlib is installed) the plot is a PNG."""
from __future__ import annotations

import argparse
import json

import pytest

from e2e_helpers import API_KEY
from shardserve.bench import serve as bench_serve

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiproc")]


def bench_args(server, tmp_path, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench_serve.add_args(p)
    return p.parse_args(["--url", server.url, "--api-key", API_KEY, "--num-prompts", "6", "--input-len", "8:24",
                         "--output-len", "4:8", "--output-json", str(tmp_path / "b.json"), *extra])


def test_bench_serve_reports(server, tmp_path):
    args = bench_args(server, tmp_path, "--request-rate", "20", "--max-concurrency", "3")
    assert bench_serve.run(args) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["completed"] == 6 and res["failed"] == 0
    assert res["total_output_tokens"] == sum(r["output_len"] for r in res["requests"])
    assert all(4 <= r["output_len"] <= 8 and r["error"] is None for r in res["requests"])
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(res[key]) == {"mean", "p50", "p90", "p99"} and res[key]["p99"] >= res[key]["p50"] > 0
    assert res["request_throughput"] > 0 and res["output_throughput"] > 0


def test_bench_serve_plot(server, tmp_path):
    png = tmp_path / "b.png"
    assert bench_serve.run(bench_args(server, tmp_path, "--plot", str(png))) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
