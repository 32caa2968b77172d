"""Entry point of one rank's process (`python -m shardserve.worker.main`): join the process group, load this
rank's shard, then serve steps from the engine's shared-memory queue until told to stop.

The launch spec arrives as JSON in the SHARDSERVE_WORKER_SPEC environment variable and every message is
msgpack: nothing a peer writes is ever unpickled."""
from __future__ import annotations

import json
import logging
import os
import sys
import traceback

import torch

from shardserve.config import engine_config_from_dict
from shardserve.distributed.message_queue import MessageQueue, QueueClosed
from shardserve.distributed.parallel_state import build_parallel_state, destroy_distributed, init_distributed
from shardserve.engine.sequence import SchedulerOutput

logger = logging.getLogger("shardserve.worker")

IDLE_POLL_S = 1.0  # how often an idle worker checks that the engine process is still alive


def _gather_ints(pstate, values: list[int]) -> list[list[int]]:
    """All-gather a few ints per rank over the world group → [[values of rank 0], ...]."""
    t = torch.tensor(values, dtype=torch.int64).unsqueeze(0)  # [1, n]
    return pstate.world.all_gather(t, dim=0).tolist()


def run_worker(spec: dict) -> int:
    rank, world_size = spec["rank"], spec["world_size"]
    cfg = engine_config_from_dict(spec["config"])
    torch.set_num_threads(max(1, spec.get("threads", 1)))
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{rank % max(1, torch.cuda.device_count())}"
    backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(cfg.device)  # before any collective: NCCL and the custom all-reduce use it
    init_distributed(rank, world_size, spec["init_method"], backend, cfg.parallel.collective_timeout_s)
    par = cfg.parallel
    own_allreduce = not par.disable_custom_all_reduce
    pstate = build_parallel_state(par.tensor_parallel_size, par.pipeline_parallel_size, 1, backend,
                                  torch.device(cfg.device), allreduce=None if own_allreduce else "gloo",
                                  custom_allreduce=own_allreduce)
    pstate.tp.overlap_chunks = par.tp_overlap_chunks
    pstate.tp.warm_up()  # NCCL communicators exist before the KV cache is sized from the free memory
    pstate.pp.warm_up(p2p=True)
    from shardserve.worker.worker import Worker
    requests = MessageQueue.attach(spec["requests"], reader_index=rank)
    results = MessageQueue.attach_writer(spec["results"]) if spec.get("results_rank") == rank else None
    layer_range = tuple(spec["layer_ranges"][pstate.pp.rank_in_group])
    worker = Worker(cfg, pstate, layer_range, spec["eos_token_ids"], progress=False)
    # every rank must agree on the number of KV blocks: the smallest any rank can hold
    local_blocks = worker.determine_num_blocks()
    info = _gather_ints(pstate, [local_blocks, worker.read_counter.bytes_read, int(worker.load_time_s * 1e3)])
    num_blocks = min(row[0] for row in info)
    worker.init_cache(num_blocks)
    if results is not None:
        results.enqueue({"ready": True, "num_blocks": num_blocks, "block_bytes": worker.kv_block_bytes(),
                         "bytes_read": [row[1] for row in info], "load_ms": [row[2] for row in info]})
    parent = os.getppid()
    while True:
        try:
            msg = requests.dequeue(timeout=IDLE_POLL_S)
        except TimeoutError:
            if os.getppid() != parent:  # the engine died: do not linger
                return 1
            continue
        except QueueClosed:
            break
        kind = msg.get("type")
        if kind == "shutdown":
            break
        if kind == "step":
            try:
                result = worker.execute(SchedulerOutput.from_dict(msg["out"]))
            except Exception:
                if results is not None:
                    results.enqueue({"error": traceback.format_exc()})
                raise
            if results is not None and result is not None:
                results.enqueue({"result": result.to_dict()})
    worker.close()
    requests.close()
    if results is not None:
        results.close()
    destroy_distributed()
    return 0


def main() -> int:
    logging.basicConfig(level=os.environ.get("SHARDSERVE_LOG_LEVEL", "WARNING"),
                        format=f"%(asctime)s %(levelname)s rank{os.environ.get('SHARDSERVE_RANK', '?')}: %(message)s")
    spec = json.loads(os.environ["SHARDSERVE_WORKER_SPEC"])
    try:
        return run_worker(spec)
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        if spec.get("error_file"):  # the engine reads this when it sees the rank die
            with open(spec["error_file"], "w") as f:
                f.write(f"{type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
