"""The engine-core process loop: `python -m shardserve.engine.core_proc` steps one LLMEngine fed over a socket.

Requests come in and outputs go out over a codec (msgpack, never pickle) stream on a loopback socket.

Launch (`core_launch.launch_core`). The parent (an EngineCoreClient) listens on a loopback port chosen by the kernel
and starts this module, writing a JSON spec on its stdin: engine args, replica index, port, a random token, torch
threads. The core connects back and says hello with the token (the client compares it in constant time and drops
strangers), builds its LLMEngine (whose executor starts the TP×PP worker processes as *its* children), then reports
ready.

Messages (maps, key "t" = type), each in one length-prefixed frame (`codec.encode_frame` / `codec.FrameDecoder`):

    client → core   add {id, prompt_token_ids, params: SamplingParams, resume?: {outputs, logprobs}}
                    abort {ids}   shutdown
    core → client   hello {token, pid}   ready {num_blocks, max_model_len}   failed {error}
                    ack {id, error|None}   outs {outs: [OutputDelta]}   stats {...get_stats()}   dead {reason}
                    hb  (every HEARTBEAT_INTERVAL_S, from a thread: liveness apart from steps)

Liveness. A daemon thread sends `hb` every 0.5 s from the hello on, whatever the engine loop does, so a long step
is never taken for a hang while a stopped (SIGSTOP) or frozen process goes silent: the client's watchdog takes a core
silent for --engine-heartbeat-timeout seconds for stalled and kills it. The socket's writes share one lock.

A frame that does not decode (say, params a SamplingParams refuses) costs only that message: an add is answered
with an error ack (its id is read from the frame's plain part), anything else is logged. An add with `resume`
continues a request another replica started (migration: `request_transfer.resume_request`).

Outputs travel as deltas (`output_wire.OutputDelta`); the client's `OutputAccumulator` rebuilds full RequestOutputs.
"""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from shardserve.distributed import codec
from shardserve.engine.output_wire import OutputEncoder
from shardserve.engine.request_transfer import resume_request
from shardserve.sampling_params import SamplingParams  # registered with the codec: an add carries one

if TYPE_CHECKING:
    from shardserve.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0        # an idle core wakes this often (and sends a stats heartbeat)
STATS_INTERVAL_S = 0.5   # a busy core sends stats at most this often (and after every abort)
RECV_BYTES = 1 << 20
EXIT_DEAD = 3            # exit code of a core whose engine lost a rank
HEARTBEAT_INTERVAL_S = 0.5  # the heartbeat thread's period


# --- the core process ------------------------------------------------------------------------------------------
class _Channel:
    """Blocking socket + codec frames (the core's side)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = codec.FrameDecoder()
        self._send_lock = threading.Lock()  # the engine loop and the heartbeat thread both write

    def send(self, msg: dict[str, Any]) -> None:
        data = codec.encode_frame(msg)
        with self._send_lock:
            self.sock.sendall(data)

    def poll(self, timeout: float) -> list[dict | codec.BadFrame] | None:
        """Messages that arrived within `timeout` (possibly none); None once the parent hung up."""
        readable, _, _ = select.select([self.sock], [], [], timeout)
        if not readable:
            return []
        data = self.sock.recv(RECV_BYTES)
        if not data:
            return None
        self.decoder.feed(data)
        return list(self.decoder)


def _stats(engine: LLMEngine) -> dict[str, Any]:
    """The engine's numeric stats, plus per-expert token counts for MoE models (plain values)."""
    out: dict[str, Any] = {k: v for k, v in engine.get_stats().items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    counts = engine.expert_counts()
    if counts:
        out["expert_counts"] = [[layer, c] for layer, c in sorted(counts.items())]
    return out


def serve(engine: LLMEngine, chan: _Channel) -> int:
    """Step the engine while it has work; between steps take in adds and aborts. Returns the exit code."""
    from shardserve.engine.llm_engine import EngineDeadError
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
            if isinstance(msg, codec.BadFrame):
                _refuse(chan, msg)
                continue
            kind = msg.get("t")
            if kind == "add":
                err = None
                try:
                    _add(engine, msg)
                except EngineDeadError as e:
                    err = f"engine failure: {e}"
                except (ValueError, TypeError) as e:
                    err = str(e)
                except Exception as e:  # noqa: BLE001 - one bad add is refused; the core keeps serving
                    logger.exception("add %s failed", msg.get("id"))
                    err = f"{type(e).__name__}: {e}"
                chan.send({"t": "ack", "id": msg["id"], "error": err})
            elif kind == "abort":
                for rid in msg["ids"]:
                    engine.abort_request(rid)
                force_stats = True
            elif kind == "shutdown":
                return 0
        if engine.has_unfinished_requests():
            try:
                outs = engine.step()
            except Exception as e:  # noqa: BLE001 - the step's requests fail; the core keeps serving
                outs = engine.fail_step(e)
            if engine.dead:  # its requests' error outputs stay here: `dead` fails them as lost, so they may migrate
                outs = [o for o in outs if not o.error]
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


def _add(engine: LLMEngine, msg: dict) -> None:
    params = msg["params"]
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
    resume = msg.get("resume")
    if resume:
        resume_request(engine, msg["id"], msg["prompt_token_ids"], params, resume["outputs"], resume.get("logprobs"))
    else:
        engine.add_request(msg["id"], None, params, prompt_token_ids=msg["prompt_token_ids"])


def _refuse(chan: _Channel, bad: codec.BadFrame) -> None:
    """A frame that did not decode: an add is refused by id (the client's request fails, nothing else); anything
    else can only be logged."""
    head = bad.head or {}
    if head.get("t") == "add" and isinstance(head.get("id"), str):
        chan.send({"t": "ack", "id": head["id"], "error": f"the request could not be decoded: {bad.error}"})
    else:
        logger.error("dropped a message that did not decode (%s): %s", head.get("t", "unknown type"), bad.error)


def start_heartbeat(chan: _Channel, interval_s: float = HEARTBEAT_INTERVAL_S) -> threading.Thread:
    """Send `hb` every `interval_s` from a daemon thread until the channel breaks (the process's life)."""
    def beat() -> None:
        msg = {"t": "hb"}
        while True:
            time.sleep(interval_s)
            try:
                chan.send(msg)
            except OSError:  # the client hung up: the main loop sees it too
                return
    t = threading.Thread(target=beat, name="shardserve-core-heartbeat", daemon=True)
    t.start()
    return t


def run_core(spec: dict[str, Any]) -> int:
    import torch
    torch.set_num_threads(max(1, int(spec.get("threads", 1))))
    sock = socket.create_connection(("127.0.0.1", int(spec["port"])), timeout=30)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    chan = _Channel(sock)
    chan.send({"t": "hello", "token": spec["token"], "pid": os.getpid()})
    start_heartbeat(chan)  # from the hello on: loading a big model is not a hang either
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
