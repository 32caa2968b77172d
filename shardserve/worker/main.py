"""Entry point of one rank's process (`python -m shardserve.worker.main`): bootstrap the rank (worker/bootstrap.py),
then serve the engine's shared-memory ring: steps (the driver rank returns their results) and collective_rpc calls
(every addressed rank answers on its own reply ring), until told to stop.

The launch spec arrives as JSON in the SHARDSERVE_WORKER_SPEC environment variable and every message is
msgpack: nothing a peer writes is ever unpickled."""
from __future__ import annotations

import json
import logging
import os
import sys
import traceback

from shardserve.distributed.message_queue import MessageQueue, QueueClosed
from shardserve.distributed.parallel_state import destroy_distributed
from shardserve.worker.bootstrap import RankSpec, bootstrap_worker
from shardserve.worker.worker import Worker

logger = logging.getLogger("shardserve.worker")

IDLE_POLL_S = 1.0  # how often an idle worker checks that the engine process is still alive
READY_ID = 0       # the reply id of the start-up report (executor/multiproc.py)


def serve(worker: Worker, requests: MessageQueue, replies: MessageQueue, results: MessageQueue | None) -> int:
    """The rank's loop: one message at a time, in the order the engine wrote them. Returns the exit code."""
    parent = os.getppid()
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
            except Exception:
                if results is not None:
                    results.enqueue({"error": traceback.format_exc()})
                raise
            if results is not None and result is not None:
                results.enqueue({"result": result})
        elif kind == "rpc" and worker.rank in msg["ranks"]:
            try:
                replies.enqueue({"id": msg["id"], "result": worker.call(msg["method"], msg["args"])})
            except Exception as e:  # the call failed, the rank did not: report it and keep serving
                logger.warning("collective_rpc(%r) failed:\n%s", msg["method"], traceback.format_exc())
                replies.enqueue({"id": msg["id"], "error": f"{type(e).__name__}: {e}"})


def run_worker(launch: dict) -> int:
    spec = RankSpec.from_dict(launch["rank_spec"])
    requests = MessageQueue.attach(launch["requests"], reader_index=spec.rank)
    replies = MessageQueue.attach_writer(launch["replies"])
    results = MessageQueue.attach_writer(launch["results"]) if launch.get("results") else None
    try:
        worker = bootstrap_worker(spec)
    except Exception as e:
        replies.enqueue({"id": READY_ID, "error": f"{type(e).__name__}: {e}"})
        raise
    replies.enqueue({"id": READY_ID, "result": True})
    code = serve(worker, requests, replies, results)  # an exception propagates: main() records it and exits
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
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        if launch.get("error_file"):  # the engine reads this when it sees the rank die
            with open(launch["error_file"], "w") as f:
                f.write(f"{type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
