"""Entry point of one rank's process (`python -m shardserve.worker.main`): bootstrap the rank (worker/bootstrap.py),
then serve the engine's shared-memory ring: steps (the driver rank returns their results) and collective_rpc calls
(every addressed rank answers on its own reply ring), until told to stop.

The launch spec arrives as JSON in the SHARDSERVE_WORKER_SPEC environment variable and every message is
msgpack: nothing a peer writes is ever unpickled.

Liveness: a daemon thread beats in the executor's heartbeat board (distributed/heartbeat.py) every 0.5 s, whatever
the main thread does, so the executor tells a stopped or frozen rank from a long step. A rank that fails sends its
error, one short line, as a FATAL_ID reply on its own ring (the full traceback goes to its stderr only), and nothing
is written to disk."""
from __future__ import annotations

import json
import logging
import os
import sys
import traceback

from shardserve.distributed.heartbeat import start_heartbeat
from shardserve.distributed.message_queue import MessageQueue, QueueClosed
from shardserve.distributed.parallel_state import destroy_distributed
from shardserve.worker.bootstrap import RankSpec, bootstrap_worker
from shardserve.worker.worker import Worker

logger = logging.getLogger("shardserve.worker")

IDLE_POLL_S = 1.0  # how often an idle worker checks that the engine process is still alive
READY_ID = 0       # the reply id of the start-up report (executor/multiproc.py)
FATAL_ID = -1      # the reply id of a rank's last words: the error it dies of
MAX_ERROR_CHARS = 240


def short_error(e: BaseException) -> str:
    """`Type: message` on one line, cut to MAX_ERROR_CHARS: what the engine passes on to clients."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _parent_check(parent: int):
    """For writes that may block on a full ring: give up once the engine process is gone."""
    def check() -> None:
        if os.getppid() != parent:
            raise QueueClosed("the engine process exited")
    return check


def serve(worker: Worker, requests: MessageQueue, replies: MessageQueue, results: MessageQueue | None) -> int:
    """The rank's loop: one message at a time, in the order the engine wrote them. Returns the exit code."""
    parent = os.getppid()
    alive = _parent_check(parent)
    while True:
        try:
            msg = requests.dequeue(timeout=IDLE_POLL_S)
        except TimeoutError:
            if os.getppid() != parent:  # the engine died: do not linger
                return 1
            continue
        except QueueClosed:
            return 0
        kind = msg.get("type")
        if kind == "shutdown":
            return 0
        if kind == "step":
            try:
                result = worker.execute(msg["sched"])
            except Exception as e:
                if results is not None:
                    results.enqueue({"error": short_error(e), "rank": worker.rank}, check=alive)
                raise
            if results is not None and result is not None:
                results.enqueue({"result": result}, check=alive)
        elif kind == "rpc" and worker.rank in msg["ranks"]:
            try:
                out = worker.call(msg["method"], msg["args"])
            except Exception as e:  # the call failed, the rank did not: report it and keep serving
                logger.warning("collective_rpc(%r) failed:\n%s", msg["method"], traceback.format_exc())
                replies.enqueue({"id": msg["id"], "error": f"{type(e).__name__}: {e}"}, check=alive)
            else:
                replies.enqueue({"id": msg["id"], "result": out}, check=alive)


def run_worker(launch: dict) -> int:
    spec = RankSpec.from_dict(launch["rank_spec"])
    requests = MessageQueue.attach(launch["requests"], reader_index=spec.rank)
    replies = MessageQueue.attach_writer(launch["replies"])
    results = MessageQueue.attach_writer(launch["results"]) if launch.get("results") else None
    if launch.get("heartbeat"):
        start_heartbeat(launch["heartbeat"], spec.world_size, spec.rank)
    try:
        try:
            worker = bootstrap_worker(spec)
        except Exception as e:
            replies.enqueue({"id": READY_ID, "error": f"{type(e).__name__}: {e}"}, timeout=5.0)
            raise
        replies.enqueue({"id": READY_ID, "result": True}, timeout=5.0)
        code = serve(worker, requests, replies, results)  # an exception propagates: main() logs it and exits
    except Exception as e:  # last words, for the executor to name the cause (it may be gone: do not wait long)
        try:
            replies.enqueue({"id": FATAL_ID, "error": short_error(e)}, timeout=1.0)
        except Exception:
            pass
        raise
    worker.close()
    for q in (requests, replies, results):
        if q is not None:
            q.close()
    destroy_distributed()
    return code


def main() -> int:
    logging.basicConfig(level=os.environ.get("SHARDSERVE_LOG_LEVEL", "WARNING"),
                        format=f"%(asctime)s %(levelname)s rank{os.environ.get('SHARDSERVE_RANK', '?')}: %(message)s")
    launch = json.loads(os.environ["SHARDSERVE_WORKER_SPEC"])
    try:
        return run_worker(launch)
    except Exception:
        traceback.print_exc(file=sys.stderr)  # the log has the traceback; the engine got one line (FATAL_ID)
        return 1


if __name__ == "__main__":
    sys.exit(main())
