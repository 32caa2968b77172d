"""The engine-core process and its wire: `python -m shardserve.engine.core_proc` runs one LLMEngine in a loop,
fed requests and drained of outputs over a msgpack stream on a loopback socket (never pickle).

Launch. The parent (the API process's AsyncEngine, or the offline DataParallelEngines) listens on a loopback port
chosen by the kernel and starts `python -m shardserve.engine.core_proc`, writing a JSON spec on its stdin:
engine args, replica index, port, a random token, torch threads. The core connects back and says hello with the
token (the parent compares it in constant time and drops strangers), builds its LLMEngine (whose executor starts
the TP×PP worker processes as *its* children), then reports ready.

Messages (msgpack maps, key "t" = type), framed by msgpack itself (`msgpack.Unpacker` over the byte stream):

    parent → core   add {id, prompt_token_ids, params}   abort {ids}   shutdown
    core → parent   hello {token, pid}   ready {num_blocks, max_model_len}   failed {error}
                    ack {id, error|None}   outs {outs: [wire outputs]}   stats {...get_stats()}   dead {reason}

An output on the wire carries only what is new (text/token/logprob deltas) plus, once finished, the full text,
so a long stream costs O(tokens) bytes; `OutputAccumulator` on the parent's side rebuilds full RequestOutputs.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

from shardserve.outputs import CompletionOutput, RequestMetrics, RequestOutput

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0        # an idle core wakes this often (and sends a stats heartbeat)
STATS_INTERVAL_S = 0.5   # a busy core sends stats at most this often (and after every abort)
RECV_BYTES = 1 << 20
EXIT_DEAD = 3            # exit code of a core whose engine lost a rank


def pack(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def new_unpacker() -> msgpack.Unpacker:
    # strict_map_key=False: request ids are str but stats may carry int keys; no ext types are accepted
    return msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=1 << 30)


def tokens_match(expected: str, got: Any) -> bool:
    return isinstance(got, str) and hmac.compare_digest(expected.encode(), got.encode())


# --- launching (parent side) -----------------------------------------------------------------------------------
def core_threads(num_cores: int, reserve: int = 0) -> int:
    """torch threads per core process (one replica): the host's CPUs, less `reserve` (kept for the API process),
    shared out over the replicas; a multi-rank replica's executor splits its budget over its ranks."""
    return max(1, ((os.cpu_count() or 1) - reserve) // max(1, num_cores))


def replica_gpus(device: str, world: int, replica: int, visible: list[str]) -> str | None:
    """CUDA_VISIBLE_DEVICES for replica `replica` of an engine on `device` (resolved: cpu | cuda[:N]) with `world`
    = tp x pp ranks: its own GPUs, the replica-th slice of the `visible` ones, so replicas never share a GPU; None
    for CPU engines."""
    if not device.startswith("cuda"):
        return None
    mine = visible[replica * world:(replica + 1) * world]
    if len(mine) < world:
        from shardserve.config import ConfigError
        raise ConfigError(f"data-parallel replica {replica} needs GPUs {replica * world}..{(replica + 1) * world - 1} "
                          f"(tp x pp = {world} per replica) but {len(visible)} are visible; lower "
                          "--data-parallel-size or tp x pp, or make more GPUs visible")
    return ",".join(mine)


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def launch_core(engine_args: dict[str, Any], replica: int, port: int, token: str, threads: int,
                log_level: str | None = None) -> subprocess.Popen:
    """Start one engine-core process; its spec (plain JSON) goes on stdin, not the environment. A GPU replica sees
    only its own GPUs (`replica_gpus`)."""
    spec = {"engine_args": engine_args, "replica": replica, "port": port, "token": token, "threads": threads,
            "log_level": log_level or logging.getLevelName(logging.getLogger().getEffectiveLevel())}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    from shardserve.config import resolve_device
    device = resolve_device(str(engine_args.get("device") or "auto"))
    world = int(engine_args.get("tensor_parallel_size") or 1) * int(engine_args.get("pipeline_parallel_size") or 1)
    gpus = replica_gpus(device, world, replica, _visible_gpus() if device.startswith("cuda") else [])
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    proc = subprocess.Popen([sys.executable, "-m", "shardserve.engine.core_proc"], stdin=subprocess.PIPE, env=env)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    return proc


# --- outputs on the wire ---------------------------------------------------------------------------------------
def _metrics_dict(m: RequestMetrics | None) -> dict | None:
    return asdict(m) if m is not None else None


class OutputEncoder:
    """RequestOutput → wire dict (deltas; prompt logprobs once, when complete; full text once finished)."""

    def __init__(self) -> None:
        self._prompt_lp_sent: set[str] = set()

    def encode(self, o: RequestOutput) -> dict[str, Any]:
        d: dict[str, Any] = {"id": o.request_id, "finished": o.finished, "error": o.error, "outs": [
            {"i": c.index, "text": c.text_delta, "ids": list(c.token_ids_delta), "lp": list(c.logprobs_delta or []),
             "fr": c.finish_reason, "sr": c.stop_reason, **({"full": c.text} if c.finish_reason else {})}
            for c in o.outputs]}
        plp = o.prompt_logprobs
        if plp is not None and o.request_id not in self._prompt_lp_sent and \
                (len(plp) >= len(o.prompt_token_ids) or o.finished):
            d["plp"] = list(plp)
            self._prompt_lp_sent.add(o.request_id)
        if o.finished:
            d["metrics"] = _metrics_dict(o.metrics)
            self._prompt_lp_sent.discard(o.request_id)
        return d


@dataclass
class _Acc:
    prompt: str | None
    prompt_token_ids: list[int]
    n: int
    want_logprobs: bool
    texts: list[str] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    lps: list[list[dict]] = field(default_factory=list)
    reasons: list[tuple[str | None, Any]] = field(default_factory=list)
    prompt_logprobs: list | None = None


class OutputAccumulator:
    """Parent side: wire dicts → cumulative RequestOutputs whose *_delta fields hold what this message added."""

    def __init__(self) -> None:
        self._reqs: dict[str, _Acc] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], n: int,
            want_logprobs: bool) -> None:
        self._reqs[request_id] = _Acc(prompt, list(prompt_token_ids), n, want_logprobs, [""] * n,
                                      [[] for _ in range(n)], [[] for _ in range(n)], [(None, None)] * n)

    def drop(self, request_id: str) -> None:
        self._reqs.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._reqs

    def decode(self, d: dict[str, Any]) -> RequestOutput | None:
        acc = self._reqs.get(d["id"])
        if acc is None:
            return None  # aborted or unknown: drop
        outs = []
        for c in d["outs"]:
            i = c["i"]
            acc.texts[i] = c["full"] if "full" in c else acc.texts[i] + c["text"]
            acc.ids[i].extend(c["ids"])
            acc.lps[i].extend(c["lp"])
            acc.reasons[i] = (c["fr"], c["sr"])
            outs.append(CompletionOutput(index=i, text=acc.texts[i], token_ids=list(acc.ids[i]),
                                         logprobs=list(acc.lps[i]) if acc.want_logprobs else None,
                                         finish_reason=c["fr"], stop_reason=c["sr"], text_delta=c["text"],
                                         token_ids_delta=list(c["ids"]), logprobs_delta=list(c["lp"])))
        if "plp" in d:
            acc.prompt_logprobs = d["plp"]
        m = d.get("metrics")
        metrics = RequestMetrics(**m) if m else None
        if d["finished"] or d.get("error"):
            self._reqs.pop(d["id"], None)
        return RequestOutput(d["id"], acc.prompt, acc.prompt_token_ids, outs, bool(d["finished"]),
                             prompt_logprobs=acc.prompt_logprobs, metrics=metrics, error=d.get("error"))

    def fail(self, request_id: str, error: str) -> RequestOutput | None:
        """An error output for a request the core can no longer finish (its replica died)."""
        acc = self._reqs.pop(request_id, None)
        if acc is None:
            return None
        outs = [CompletionOutput(index=i, text=acc.texts[i], token_ids=list(acc.ids[i]), finish_reason="error")
                for i in range(acc.n)]
        return RequestOutput(request_id, acc.prompt, acc.prompt_token_ids, outs, True, error=error)


# --- the core process ------------------------------------------------------------------------------------------
class _Channel:
    """Blocking socket + msgpack framing (the core's side)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.unpacker = new_unpacker()

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(pack(msg))

    def poll(self, timeout: float) -> list[dict] | None:
        """Messages that arrived within `timeout` (possibly none); None once the parent hung up."""
        readable, _, _ = select.select([self.sock], [], [], timeout)
        if not readable:
            return []
        data = self.sock.recv(RECV_BYTES)
        if not data:
            return None
        self.unpacker.feed(data)
        return list(self.unpacker)


def _stats(engine) -> dict[str, Any]:
    """The engine's numeric stats, plus per-expert token counts for MoE models (msgpack-able)."""
    out: dict[str, Any] = {k: v for k, v in engine.get_stats().items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    counts = engine.expert_counts()
    if counts:
        out["expert_counts"] = [[layer, c] for layer, c in sorted(counts.items())]
    return out


def serve(engine, chan: _Channel) -> int:
    """Step the engine while it has work; between steps take in adds and aborts. Returns the exit code."""
    from shardserve.engine.llm_engine import EngineDeadError
    from shardserve.sampling_params import SamplingParams
    encoder = OutputEncoder()
    chan.send({"t": "stats", **_stats(engine)})
    last_stats = time.monotonic()
    while True:
        busy = engine.has_unfinished_requests()
        msgs = chan.poll(0.0 if busy else IDLE_WAIT_S)
        if msgs is None:
            return 0  # the parent went away
        force_stats = False
        for msg in msgs:
            kind = msg.get("t")
            if kind == "add":
                err = None
                try:
                    engine.add_request(msg["id"], None, SamplingParams.from_dict(msg["params"]),
                                       prompt_token_ids=msg["prompt_token_ids"])
                except EngineDeadError as e:
                    err = f"engine failure: {e}"
                except (ValueError, TypeError) as e:
                    err = str(e)
                chan.send({"t": "ack", "id": msg["id"], "error": err})
            elif kind == "abort":
                for rid in msg["ids"]:
                    engine.abort_request(rid)
                force_stats = True
            elif kind == "shutdown":
                return 0
        if engine.has_unfinished_requests():
            outs = engine.step()
            if outs:
                chan.send({"t": "outs", "outs": [encoder.encode(o) for o in outs]})
        if engine.dead:
            chan.send({"t": "dead", "reason": engine.dead})
            return EXIT_DEAD
        now = time.monotonic()
        if force_stats or now - last_stats >= (STATS_INTERVAL_S if busy else IDLE_WAIT_S) \
                or (busy and not engine.has_unfinished_requests()):
            chan.send({"t": "stats", **_stats(engine)})
            last_stats = now


def run_core(spec: dict[str, Any]) -> int:
    import torch
    torch.set_num_threads(max(1, int(spec.get("threads", 1))))
    sock = socket.create_connection(("127.0.0.1", int(spec["port"])), timeout=30)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    chan = _Channel(sock)
    chan.send({"t": "hello", "token": spec["token"], "pid": os.getpid()})
    from shardserve.engine.args import EngineArgs
    from shardserve.engine.llm_engine import LLMEngine
    try:
        args = EngineArgs.from_kwargs(**spec["engine_args"])
        engine = LLMEngine(args.create_config(progress=False), progress=False)
    except Exception as e:  # start-up failed: say why, then exit
        chan.send({"t": "failed", "error": f"{type(e).__name__}: {e}"})
        logger.error("engine core %s failed to start:\n%s", spec["replica"], traceback.format_exc())
        return 1
    chan.send({"t": "ready", "num_blocks": engine.num_blocks, "max_model_len": engine.cfg.model.max_model_len,
               "pid": os.getpid()})
    try:
        return serve(engine, chan)
    except (BrokenPipeError, ConnectionResetError):
        return 0
    finally:
        engine.shutdown()


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides when we stop
    spec = json.loads(sys.stdin.read())
    logging.basicConfig(level=spec.get("log_level") or "WARNING",
                        format=f"%(asctime)s %(levelname)s core{spec.get('replica', '?')}: %(message)s")
    try:
        return run_core(spec)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
