"""tools/gpu_check.py (`make gpu-check`, issue 15): the plan, the runner's isolation of failing and slow steps, the
summary, and the whole pipeline at toy sizes on CPU with the GPU machine's missing packages blocked."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = ["env", "models", "tests", "kernels", "latency-graphs", "throughput", "latency-eager"]


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look the module up by name
    spec.loader.exec_module(mod)
    return mod


def _arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_gpu_plan_has_the_issue_sizes(gc, tmp_path):
    steps = gc.build_plan(tmp_path, smoke=False, pytest_workers=8)
    assert [s.name for s in steps] == STEPS
    by = {s.name: s for s in steps}
    assert by["models"].background and all(by[n].needs == ("models",) for n in STEPS[4:])
    graphs, eager = by["latency-graphs"].cmd, by["latency-eager"].cmd
    assert _arg(graphs, "--batch-sizes") == "1,64" and _arg(graphs, "--device") == "cuda"
    assert "--enforce-eager" in eager and "--enforce-eager" not in graphs
    assert graphs[:graphs.index("--output-json")] == [a for a in eager[:eager.index("--output-json")]
                                                      if a != "--enforce-eager"]
    thr = by["throughput"].cmd
    assert "--compare-hf" in thr and _arg(thr, "--num-prompts") == "256"
    assert _arg(thr, "--input-len") == _arg(thr, "--output-len") == "100:1024"
    assert _arg(by["env"].cmd, "--copy-bytes") == str(4 << 30)
    # the sequential steps' budgets may exceed the whole budget (each is a cap), but none alone may
    assert all(s.budget_s < gc.BUDGET_S for s in steps) and gc.BUDGET_S <= 480


def test_cuda_test_files_are_the_ones_that_switch_on_cuda(gc):
    files = gc.cuda_test_files()
    for f in ("tests/unit/test_triton_decode.py", "tests/unit/test_triton_prefill.py",
              "tests/unit/test_fused_kernels.py", "tests/unit/test_cuda_graph.py",
              "tests/parity/test_gpu_kernels_path.py", "tests/dist/test_custom_allreduce.py"):
        assert f in files
    assert "tests/unit/test_gpu_check.py" not in files and all((REPO / f).is_file() for f in files)


def test_dry_run_prints_every_step_and_writes_nothing(gc, tmp_path, capsys):
    out = tmp_path / "out"
    assert gc.main(["--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert all(f"[{n}]" in text for n in STEPS) and "bench throughput" in text
    assert not out.exists()


def test_runner_isolates_failing_and_slow_steps(gc, tmp_path):
    py = sys.executable
    steps = [
        gc.Step("bg", 30, [py, "-c", "raise SystemExit(3)"], "a background step that fails", background=True),
        gc.Step("slow", 1, [py, "-c", "import time; print('started', flush=True); time.sleep(60)"], "too slow"),
        gc.Step("good", 30, [py, "-c", f"import json; json.dump({{'x': 1}}, open({str(tmp_path / 'g.json')!r}, 'w'))"],
                "fine", tmp_path / "g.json"),
        gc.Step("after-bg", 30, [py, "-c", "pass"], "needs bg", needs=("bg",)),
    ]
    out = tmp_path / "out"
    out.mkdir()
    runner = gc.Runner(steps, out, tmp_path, budget_s=60, pack=True, mode="test", block_dir=None)
    assert runner.run() == 1
    summary = json.loads((out / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"bg": "failed", "slow": "timeout", "good": "ok", "after-bg": "skipped"}
    assert not summary["ok"] and summary["steps"][2]["result"] == {"x": 1}
    assert sorted(p.name for p in out.iterdir()) == ["steps.tar", "summary.json", "summary.txt"]
    with tarfile.open(out / "steps.tar") as tar:
        names = tar.getnames()
        assert sorted(names) == sorted(f"{n}.{ext}" for n in status for ext in ("json", "log"))
        assert "started" in tar.extractfile("slow.log").read().decode()
    assert "timeout" in (out / "summary.txt").read_text()


def test_targets_and_key_lines(gc):
    lat = {"copy_gbps": 4000.0, "results": [{"batch_size": 1, "tpot_ms": 5.0, "bw_share": 0.82, "weight_gbps": 3280.0},
                                             {"batch_size": 64, "tpot_ms": 7.0, "bw_share": 0.6, "weight_gbps": 2300.0}]}
    records = {"env": {"result": {"copy_gbps": 4100.0}}, "latency-graphs": {"result": lat},
               "throughput": {"result": {"engine_tok_s": 9000.0, "hf_tok_s": 1000.0, "ratio": 9.0}}}
    t = gc.targets(records)
    assert t["batch1_decode_bw_share_graphs"]["met"] and not t["throughput_vs_transformers"]["met"]
    assert t["batch1_decode_bw_share_graphs"]["share_of_env_copy"] == pytest.approx(3280 / 4100)
    assert gc.key_line("latency-graphs", lat) == "b1 TPOT 5.00 ms, 82% of copy bw; b64 TPOT 7.00 ms, 60% of copy bw"
    assert "9.00x" in gc.key_line("throughput", records["throughput"]["result"])
    assert gc.key_line("kernels", None) == "-" and "unexpected" in gc.key_line("env", {"copy_gbps": None})


@pytest.mark.slow
def test_cpu_smoke_runs_every_step_without_the_packages_the_gpu_machine_lacks(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--cpu-smoke", "--pack", "--out",
                           str(out), "--work-dir", str(work), "--budget-s", "400"],
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and [s["step"] for s in summary["steps"]] == STEPS
    assert (work / "block-missing" / "sitecustomize.py").exists()  # fastapi, gguf, openai... were unimportable
    res = {s["step"]: s["result"] for s in summary["steps"]}
    assert res["env"]["copy_gbps"] > 0 and not res["env"]["cuda_available"]
    assert [m["rc"] for m in res["models"]["models"]] == [0, 0]
    assert res["tests"]["failures"] == res["tests"]["errors"] == 0 and res["tests"]["files"]
    assert res["kernels"]["interpreted"] and len(res["kernels"]["results"]) == 6
    for name in ("latency-graphs", "latency-eager"):
        assert [r["batch_size"] for r in res[name]["results"]] == [1, 3]
    assert res["throughput"]["ratio"] > 0
    assert set(summary["targets"]) == {"batch1_decode_bw_share_graphs", "throughput_vs_transformers"}
    with tarfile.open(out / "steps.tar") as tar:
        assert sorted(tar.getnames()) == sorted(f"{n}.{ext}" for n in STEPS for ext in ("json", "log"))
    assert sorted(p.name for p in out.iterdir()) == ["steps.tar", "summary.json", "summary.txt"]
    tail = proc.stdout.strip().splitlines()[-10:]  # the table comes last
    assert any(line.startswith("throughput ") for line in tail) and tail[-1].startswith("target ")
