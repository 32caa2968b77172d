"""`shardserve plan`: JSON schema, table output, bad input, hardware presets and files."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from shardserve.planner.cli import add_plan_parser, main, run_plan
from shardserve.planner.hardware import GiB, PlannerError, get_gpu, gpu_names, parse_gpus

LAYOUT_KEYS = {"tp", "pp", "dp", "ep", "fits", "memory_per_device", "max_concurrent_seqs", "prefill_latency_s",
               "decode_tok_s_per_seq", "throughput_tok_s"}
MEMORY_KEYS = {"weights", "kv_cache", "activations", "overhead", "free"}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="shardserve")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["plan", *argv])


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args = parse(argv)
    assert args.func is run_plan
    code = run_plan(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_json_schema() -> None:
    code, out, err = run(["--model", "Llama-3.1-8B", "--gpus", "8xH100", "--batch", "64", "--json"])
    assert code == 0 and err == ""
    doc = json.loads(out)
    assert doc["layouts"]
    for lay in doc["layouts"]:
        assert LAYOUT_KEYS <= set(lay)
        assert set(lay["memory_per_device"]) == MEMORY_KEYS
        assert all(isinstance(v, int) for v in lay["memory_per_device"].values())
        assert all(isinstance(lay[k], int) and lay[k] >= 1 for k in ("tp", "pp", "dp", "ep"))
        assert lay["tp"] * lay["pp"] * lay["dp"] == 8
        assert isinstance(lay["fits"], bool) and isinstance(lay["max_concurrent_seqs"], int)
        for key in ("prefill_latency_s", "decode_tok_s_per_seq", "throughput_tok_s"):
            assert (isinstance(lay[key], float) and lay[key] > 0) if lay["fits"] else lay[key] is None
    rec = doc["recommended"]
    assert LAYOUT_KEYS <= set(rec)
    assert isinstance(rec["reasons"], list) and rec["reasons"] and all(isinstance(r, str) for r in rec["reasons"])
    assert {k: v for k, v in rec.items() if k != "reasons"} in doc["layouts"]
    assert rec == {**doc["layouts"][0], "reasons": rec["reasons"]}  # layouts are sorted best first


def test_json_infeasible_names_smallest_cluster() -> None:
    code, out, _ = run(["--model", "Llama-3.1-405B", "--gpus", "8xH100", "--json"])
    assert code == 1
    doc = json.loads(out)
    assert doc["recommended"] is None
    smallest = doc["infeasible"]["smallest_cluster"]
    assert smallest == {"gpus": 16, "gpus_per_node": 8, "nodes": 2, "gpu": "H100-SXM",
                        "layout": smallest["layout"]}
    assert "16xH100-SXM (2 nodes of 8)" in doc["infeasible"]["message"]
    assert not any(lay["fits"] for lay in doc["layouts"])


def test_table_output_marks_recommendation() -> None:
    code, out, _ = run(["--model", "Qwen3-30B-A3B", "--gpus", "4xH100", "--batch", "1"])
    assert code == 0
    assert "Qwen3-30B-A3B on 4xH100-SXM" in out
    assert "recommended: tp=" in out and "fastest single-sequence decode" in out


def test_table_output_for_infeasible() -> None:
    code, out, _ = run(["--model", "Llama-2-70B", "--gpus", "1xL4"])
    assert code == 1 and "no layout fits" in out and "smallest cluster that fits" in out


@pytest.mark.parametrize("argv,message", [
    (["--model", "Llama-3.1-8B", "--gpus", "8xH1000"], "unknown GPU 'H1000'; valid names: A100-40GB"),
    (["--model", "Llama-3.1-8B", "--gpus", "H100"], "malformed --gpus 'H100'"),
    (["--model", "Llama-3.1-8B", "--gpus", "8x"], "malformed --gpus"),
    (["--model", "Llama-3.1-8B", "--gpus", "0xH100"], "at least 1"),
    (["--model", "Llama-9-1T", "--gpus", "8xH100"], "presets: Llama-2-7B"),
    (["--model", "Llama-3.1-8B", "--gpus", "2xL4", "--interconnect", "nvlink"], "L4 has no NVLink"),
    (["--model", "Llama-3.1-8B", "--gpus", "8xH100", "--max-model-len", "512"], "shorter than --isl + --osl"),
    (["--model", "Llama-3.1-8B", "--gpus", "2x/nonexistent/hw.yaml"], "does not exist"),
])
def test_bad_input_exits_2_with_choices(argv: list[str], message: str) -> None:
    code, out, err = run(argv)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model", "Llama-3.1-8B", "--gpus", "8xH100", "--batch", "4", "--rate", "2"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model", "Llama-3.1-8B", "--gpus", "8xH100", "--dtype", "fp4"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--gpus", "--nodes", "--interconnect", "--dtype", "--kv-dtype", "--max-model-len",
                 "--batch", "--rate", "--isl", "--osl", "--json"):
        assert flag in text
    assert "H100-SXM" in text and "Qwen3-30B-A3B" in text


def test_gpu_names_case_insensitive_with_aliases() -> None:
    assert get_gpu("h100").name == get_gpu("H100-SXM").name == "H100-SXM"
    assert get_gpu("A100").name == "A100-80GB" and get_gpu("a100-40gb").name == "A100-40GB"
    assert get_gpu("rtx 4090").name == get_gpu("4090").name == "RTX-4090"
    assert get_gpu("h100-pcie").name == "H100-PCIe"
    assert set(gpu_names()) == {"H100-SXM", "H100-PCIe", "H200", "B200", "A100-80GB", "A100-40GB", "L40S", "L4",
                                "RTX-4090"}
    for name in gpu_names():
        gpu = get_gpu(name)
        assert gpu.memory_bytes > 16 * GiB and gpu.memory_bandwidth > 1e11 and gpu.bf16_flops > 1e14
        assert gpu.source


def test_parse_gpus_counts_per_node_and_default_links() -> None:
    c = parse_gpus("8xH100", nodes=2)
    assert (c.num_gpus, c.gpus_per_node, c.interconnect) == (16, 8, "nvlink")
    assert parse_gpus("4XL40S").interconnect == "pcie"
    assert parse_gpus("2xH100-PCIe").interconnect == "pcie"
    assert parse_gpus("8xRTX-4090").gpu.name == "RTX-4090"  # the x inside the name is not the separator
    with pytest.raises(PlannerError, match="unknown interconnect"):
        parse_gpus("8xH100", interconnect="ethernet")


def test_hardware_file_yaml_and_json(tmp_path) -> None:
    yml = tmp_path / "myhw.yaml"
    yml.write_text("name: MyGPU\nmemory_gib: 64\nmemory_bandwidth_gbps: 2000\nbf16_tflops: 400\n"
                   "fp8_tflops: 800\nnvlink_gbps: 200\npcie_gbps: 32\n")
    c = parse_gpus(f"4x{yml}")
    assert c.gpu.name == "MyGPU" and c.gpu.memory_bytes == 64 * GiB and c.interconnect == "nvlink"
    assert c.gpu.flops_for("fp8") == 800e12 and c.gpu.nvlink_group == 8
    js = tmp_path / "hw.json"
    js.write_text(json.dumps({"name": "J", "memory_gib": 24, "memory_bandwidth_gbps": 500, "bf16_tflops": 100}))
    c2 = parse_gpus(f"2x{js}")
    assert c2.interconnect == "pcie" and c2.gpu.flops_for("fp8") == 100e12  # no FP8: BF16 fallback
    code, out, _ = run(["--model", "Qwen3-8B", "--gpus", f"4x{yml}", "--json"])
    assert code == 0 and json.loads(out)["cluster"]["gpu"] == "MyGPU"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: X\nmemory_gib: 10\nbf16_tflops: 1\nwarp_drive: 9\n")
    with pytest.raises(PlannerError, match=r"missing \['memory_bandwidth_gbps'\], unknown \['warp_drive'\]"):
        parse_gpus(f"1x{bad}")


def test_config_json_model_argument(tmp_path) -> None:
    from shardserve.planner.model_presets import get_model_preset

    (tmp_path / "config.json").write_text(json.dumps(get_model_preset("Mistral-7B")))
    code, out, _ = run(["--model", str(tmp_path), "--gpus", "1xL40S", "--json", "--kv-dtype", "fp8"])
    doc = json.loads(out)
    assert code == 0 and doc["model"]["params"] == 7241732096 and doc["request"]["kv_dtype"] == "fp8"
