"""`bench comm`, `bench latency` and `bench kernels`: flags, nccl-tests bandwidth factors, clear errors, and a tp=1 latency run."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from shardserve.bench import comm, kernels, latency
from shardserve.layers.cpu.auto_dtype import cpu_auto_dtype


def _parse(mod, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    mod.add_args(p)
    return p.parse_args(argv)


def test_comm_defaults_and_sizes():
    args = _parse(comm, [])
    assert (args.ranks, args.backend, args.min_bytes, args.max_bytes) == (2, "auto", "4", "64MiB")
    assert args.ops.split(",") == ["all_reduce", "all_gather", "reduce_scatter", "send_recv"]
    assert comm._sizes(4, 64 << 20, 4) == [4 << (2 * i) for i in range(13)]  # 4 B ... 64 MiB
    assert comm._sizes(4, 32, 2) == [4, 8, 16, 32]


@pytest.mark.parametrize("n", [2, 4, 8])
def test_bus_bandwidth_factors_follow_nccl_tests(n):
    assert comm.bus_factor("all_reduce", n) == pytest.approx(2 * (n - 1) / n)
    assert comm.bus_factor("all_gather", n) == pytest.approx((n - 1) / n)
    assert comm.bus_factor("reduce_scatter", n) == pytest.approx((n - 1) / n)
    assert comm.bus_factor("send_recv", n) == 1.0


@pytest.mark.parametrize("argv, match", [
    (["--backend", "mpi"], "--backend mpi unknown"),
    (["--ops", "all_to_all"], "--ops all_to_all unknown"),
    (["-n", "1"], "at least 2 ranks"),
    (["--min-bytes", "1MiB", "--max-bytes", "1KiB"], "--min-bytes <= --max-bytes"),
])
def test_comm_rejects_bad_flags_before_starting_ranks(argv, match):
    with pytest.raises(ValueError, match=match):
        comm.run(_parse(comm, argv))


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="has GPUs")
def test_comm_nccl_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="nccl needs 2 CUDA GPUs.*--backend auto, shm or gloo"):
        comm.run(_parse(comm, ["--backend", "nccl"]))


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="the error is for machines with fewer than 2 GPUs")
def test_comm_custom_without_a_gpu_per_rank_is_a_clear_error():
    with pytest.raises(ValueError, match="custom all-reduce and needs 2 CUDA GPUs.*on CPU use --backend shm"):
        comm.run(_parse(comm, ["--backend", "custom"]))


def test_latency_flags_include_engine_args():
    args = _parse(latency, ["-tp", "2", "--batch-sizes", "1,16", "--allreduce", "gloo"])
    assert (args.tensor_parallel_size, args.input_len, args.output_len, args.iters) == (2, 128, 32, 3)
    assert args.batch_sizes == "1,16" and args.allreduce == "gloo" and args.output_json is None


def test_latency_allreduce_shm_with_disable_custom_all_reduce_is_refused():
    args = _parse(latency, ["-tp", "2", "--allreduce", "shm", "--disable-custom-all-reduce"])
    with pytest.raises(ValueError, match="contradicts --disable-custom-all-reduce"):
        latency.run(args)


@pytest.mark.parametrize("tp, device, disabled, env, want", [
    (1, "cpu", False, "gloo", "-"),
    (2, "cpu", False, "shm", "shm"),
    (2, "cpu", True, "auto", "gloo (--disable-custom-all-reduce)"),
    (2, "cuda:0", False, "auto", "custom where the GPUs allow (up to 2 MiB), else nccl"),
    (2, "cuda:0", True, "auto", "nccl (custom all-reduce off)"),
])
def test_latency_names_what_the_all_reduces_ran_on(monkeypatch, tp, device, disabled, env, want):
    monkeypatch.setenv("SHARDSERVE_ALLREDUCE", env)
    assert latency._allreduce_label(tp, device, disabled) == want


def test_latency_tp1_run_writes_json(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHARDSERVE_ALLREDUCE", "auto")  # recorded, so what the bench sets is undone afterwards
    monkeypatch.setenv("SHARDSERVE_COMM_TIMING", "0")
    out = tmp_path / "lat.json"
    args = _parse(latency, ["--model", str(tiny_model), "--device", "cpu", "--kv-cache-memory", "8MiB", "--max-model-len", "256",
                            "--input-len", "8", "--output-len", "4", "--batch-sizes", "1,3", "--iters", "1",
                            "--output-json", str(out)])
    try:
        assert latency.run(args) == 0
    finally:
        from shardserve.distributed.parallel_state import enable_collective_timing
        enable_collective_timing(False)
    data = json.loads(out.read_text())
    assert data["tp"] == 1 and [r["batch_size"] for r in data["results"]] == [1, 3]
    assert data["dtype"] == str(cpu_auto_dtype()[0]).removeprefix("torch.")  # --dtype auto, resolved
    for r in data["results"]:
        assert r["prefill_ms"] > 0 and r["tpot_ms"] > 0 and r["decode_steps"] == 3  # output 4 = 1 prefill + 3
        assert r["decode_tok_s"] == pytest.approx(r["batch_size"] / r["tpot_ms"] * 1e3)
        assert r["weight_gbps"] == pytest.approx(data["weight_bytes_per_step"] / r["tpot_ms"] * 1e-6)
        assert r["bw_share"] == pytest.approx(r["weight_gbps"] / data["copy_gbps"])
    assert data["copy_gbps"] > 0.1
    assert "TPOT ms" in capsys.readouterr().out


KERNEL_ARGS = ["--batch-sizes", "2", "--context-lens", "40", "--prefill", "2x24,1x8+20", "--tokens", "3",
               "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--hidden", "64", "--intermediate", "96",
               "--iters", "1"]


def test_kernels_bench_compares_every_kernel_with_torch(tmp_path, capsys):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU: the Triton interpreter (conftest sets it)
    out = tmp_path / "k.json"
    args = _parse(kernels, ["--device", device, "--dtype", "float32", *KERNEL_ARGS, "--output-json", str(out)])
    assert kernels.run(args) == 0
    data = json.loads(out.read_text())
    assert data["interpreted"] == (device == "cpu")
    assert [r["op"] for r in data["results"]] == ["decode", "prefill", "prefill", "add_rms_norm", "rotary",
                                                  "silu_and_mul"]
    for r in data["results"]:
        assert r["max_abs_diff"] < 1e-4 and r["torch_us"] > 0 and r["triton_us"] > 0, r
    assert "after 20 cached" in capsys.readouterr().out


def test_kernels_bench_refuses_bad_flags(monkeypatch):
    with pytest.raises(ValueError, match="--ops"):
        kernels.run(_parse(kernels, ["--device", "cpu", "--ops", "decode,matmul"]))
    with pytest.raises(ValueError, match="--kv-heads"):
        kernels.run(_parse(kernels, ["--device", "cpu", "--heads", "6", "--kv-heads", "4"]))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.run(_parse(kernels, ["--device", "cpu"]))
