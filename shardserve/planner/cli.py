"""The `shardserve plan` subcommand: arguments, the rich table, and the --json output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from shardserve.planner.hardware import GiB, INTERCONNECTS, PlannerError, gpu_names, parse_gpus
from shardserve.planner.memory import DTYPE_BYTES, ModelSpec, load_model_config
from shardserve.planner.model_presets import model_preset_names
from shardserve.planner.recommend import Plan, make_plan
from shardserve.planner.search import Request

DTYPES = tuple(DTYPE_BYTES)

_DESCRIPTION = """\
Estimate memory per device and performance for every tensor/pipeline/data/expert-parallel layout
of a model on a cluster, and recommend one. With --batch 1 the recommendation minimises
single-sequence decode latency; otherwise it maximises aggregate throughput at the requested
batch or request rate (or with memory filled when neither is given)."""

_EPILOG = f"""\
GPU presets (case-insensitive; aliases H100=H100-SXM, A100=A100-80GB, 4090=RTX-4090):
  {', '.join(gpu_names())}
Model presets: {', '.join(model_preset_names())}
A user-defined GPU is a YAML or JSON file: --gpus 4x./myhw.yaml (fields in docs/planner.md).

examples:
  shardserve plan --model Llama-3.1-70B --gpus 8xH100
  shardserve plan --model ./my-model --gpus 4xA100-80GB --batch 1 --json
  shardserve plan --model Llama-3.1-405B --gpus 8xH100 --nodes 2 --dtype fp8 --rate 5
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `plan` subcommand to a CLI's subparsers; the parser's default func is run_plan."""
    p = subparsers.add_parser("plan", help="recommend a parallel layout for a model on a cluster",
                              description=_DESCRIPTION, epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR|config.json|PRESET",
                   help="model directory holding config.json, a config.json file, or a preset name "
                        "(e.g. Llama-3.1-8B, Qwen3-30B-A3B; HF repo ids accepted)")
    p.add_argument("--gpus", required=True, metavar="COUNTxNAME",
                   help="GPUs per node and their kind, e.g. 8xH100, 2xA100-80GB, 4x./myhw.yaml")
    p.add_argument("--nodes", type=_positive_int, default=1, metavar="N",
                   help="number of identical nodes; total GPUs = COUNT x N, TP stays within a node (default 1)")
    p.add_argument("--interconnect", choices=INTERCONNECTS, default=None,
                   help="link between GPUs of a node: nvlink, pcie, or ib (GPUs that only meet over the "
                        "network); default: NVLink for SXM parts, PCIe otherwise. Nodes always talk over IB")
    p.add_argument("--dtype", choices=DTYPES, default="bf16",
                   help="weight precision of the decoder matrices (embeddings and norms stay 16-bit); "
                        "default bf16")
    p.add_argument("--kv-dtype", choices=DTYPES, default=None,
                   help="KV cache precision (default: fp16 when --dtype fp16, else bf16)")
    p.add_argument("--max-model-len", type=_positive_int, default=None, metavar="L",
                   help="longest sequence that must fit (default: the model's maximum capped at 8192, "
                        "at least --isl + --osl)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--batch", type=_positive_int, default=None, metavar="B",
                      help="concurrent sequences in the whole cluster; --batch 1 optimises single-sequence "
                           "decode latency, larger batches aggregate throughput")
    load.add_argument("--rate", type=_positive_float, default=None, metavar="R",
                      help="offered load in requests per second; recommends the lowest-latency layout "
                           "that sustains it")
    p.add_argument("--isl", type=_positive_int, default=1024, metavar="I",
                   help="input (prompt) tokens per request (default 1024)")
    p.add_argument("--osl", type=_positive_int, default=256, metavar="O",
                   help="output tokens per request (default 256)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.set_defaults(func=run_plan)
    return p


def build_plan(args: argparse.Namespace) -> Plan:
    """Resolve the arguments into a Plan (raises PlannerError on bad input)."""
    config, name = load_model_config(args.model)
    spec = ModelSpec.from_config(config, name)
    cluster = parse_gpus(args.gpus, nodes=args.nodes, interconnect=args.interconnect)
    kv_dtype = args.kv_dtype or ("fp16" if args.dtype == "fp16" else "bf16")
    req = Request(dtype=args.dtype, kv_dtype=kv_dtype, max_model_len=args.max_model_len, batch=args.batch,
                  rate=args.rate, isl=args.isl, osl=args.osl)
    req.context_len(spec)  # validates --max-model-len against --isl + --osl
    return make_plan(spec, cluster, req)


def run_plan(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run `shardserve plan`: 0 with a recommendation, 1 when nothing fits, 2 on bad input."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        plan = build_plan(args)
    except (PlannerError, ValueError) as exc:
        print(f"shardserve plan: error: {exc}", file=err)
        return 2
    if args.json:
        json.dump(plan.to_dict(), out, indent=2)
        out.write("\n")
    else:
        print_table(plan, out)
    return 0 if plan.recommended is not None else 1


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def print_table(plan: Plan, out: TextIO) -> None:
    """Human-readable plan: a rich table of layouts (best first) and the recommendation."""
    from rich.console import Console
    from rich.table import Table

    tty = hasattr(out, "isatty") and out.isatty()
    console = Console(file=out, width=None if tty else 160, highlight=False, soft_wrap=True)
    req, spec = plan.request, plan.spec
    if req.objective == "latency":
        load = "batch 1 (latency)"
    elif req.objective == "rate":
        load = f"rate {req.rate:g} req/s"
    else:
        load = f"batch {req.batch}" if req.batch else "memory filled"
    title = (f"{spec.name} on {plan.cluster.describe()}  weights {req.dtype}, KV {req.kv_dtype}, "
             f"max_model_len {req.context_len(spec)}, isl {req.isl}, osl {req.osl}, {load}")
    table = Table(title=title, title_justify="left")
    for col in ("", "tp", "pp", "dp", "ep", "fits", "weights GiB", "KV GiB", "act GiB", "free GiB",
                "max seqs", "TTFT ms", "tok/s/seq", "tok/s total"):
        table.add_column(col, justify="right" if col not in ("", "fits") else "left")
    for lay in plan.layouts:
        m = lay.memory_per_device
        mark = "*" if lay is plan.recommended else ""
        fits = "yes" if lay.fits and lay.sustains_rate is not False else ("no rate" if lay.fits else "no")
        table.add_row(mark, str(lay.tp), str(lay.pp), str(lay.dp), str(lay.ep), fits, _gib(m.weights),
                      _gib(m.kv_cache), _gib(m.activations), _gib(m.free), str(lay.max_concurrent_seqs),
                      _num(lay.prefill_latency_s and lay.prefill_latency_s * 1000, ".0f"),
                      _num(lay.decode_tok_s_per_seq, ".1f"), _num(lay.throughput_tok_s, ",.0f"),
                      style="bold green" if mark else ("dim" if not lay.fits else None))
    console.print(table)
    if plan.excluded:
        reasons = sorted({reason for _, reason in plan.excluded})
        console.print(f"excluded {len(plan.excluded)} layouts: " + "; ".join(reasons))
    if plan.recommended is None:
        console.print(f"[bold red]no layout fits:[/] {plan.message}")
        return
    console.print(f"[bold]recommended: {plan.recommended.label()}[/]")
    for reason in plan.reasons:
        console.print(f"  - {reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardserve")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
