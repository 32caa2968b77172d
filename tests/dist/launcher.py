"""Run one function on N ranks in spawned processes (gloo on CPU): the harness of every multi-rank test.

    from launcher import run_ranks        # in tests/dist; elsewhere in tests/: from dist.launcher import ...

    def _body(rank: int, world_size: int, hidden: int) -> dict:   # module level: spawn imports it
        state = build_parallel_state(tp_size=world_size)          # the process group already exists
        out = state.tp.all_reduce(torch.full((hidden,), float(rank)))
        return {"rank": rank, "out": out}                         # msgpack-able; tensors are fine

    def test_sum():
        results = run_ranks(_body, 2, 8, timeout=60)              # [rank 0's return, rank 1's return]
        assert torch.equal(results[1]["out"], torch.full((8,), 1.0))

What `run_ranks(fn, world_size, *args, kwargs=None, timeout=60, backend="gloo", init=True, threads=1,
grace_s=2.0)` guarantees:

- Each rank is a fresh `spawn` process that calls `init_distributed(rank, world_size,
  tcp://<loopback>:<free port>, backend)` (unless `init=False`), then `fn(rank, world_size, *args,
  **kwargs)`, then `destroy_distributed()`. Ports are free ports (bind 0); a port stolen between
  choosing and binding is retried with a new one.
- `fn` must be a module-level function (it is passed by name and imported in the child). `args`,
  `kwargs` and each rank's return value travel msgpack-encoded (`shardserve.distributed.codec`):
  plain values, tensors and registered dataclasses; nothing crosses processes as pickle except the
  spawn bootstrap itself (module names, strings, ints, bytes).
- If any rank raises or dies, the others get `grace_s` to finish or fail too (the first failure is
  often a symptom of another rank's), then are killed, and `RankFailure` is raised with the child
  traceback text of every failed rank.
- Nothing outlives `timeout` seconds: collectives time out at `timeout / 2` (a gloo error with a
  traceback), each child dumps its Python stacks and exits at `timeout - 1` (also if this process
  dies), and at `timeout` everything left is killed; `RankTimeout` then carries the stack dumps.
- Each rank runs with `threads` torch threads (default 1: the suite fits 2 cores).
"""

from __future__ import annotations

import faulthandler
import importlib
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

from shardserve.distributed import codec
from shardserve.utils.network import get_free_port, get_loopback_ip, tcp_init_method

__all__ = ["run_ranks", "RankFailure", "RankTimeout"]

_PORT_IN_USE = ("Address already in use", "EADDRINUSE", "address already in use")


class RankFailure(AssertionError):
    """One or more ranks raised or died; the message holds their tracebacks."""


class RankTimeout(RankFailure, TimeoutError):
    """Ranks were still running at the deadline and were killed; the message holds their stacks."""


# --------------------------------------------------------------------------------------- child side


def _loopback_ifname() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def _write_result(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)  # the parent never sees half a file


def _rank_main(fn_ref: str, rank: int, world_size: int, init_method: str | None, backend: str,
               collective_timeout_s: float, watchdog_s: float, threads: int | None,
               workdir: str, payload: bytes) -> None:
    """Entry point of one spawned rank; reports {"ok", "value" | "error"} msgpack-encoded to a file."""
    stacks = open(os.path.join(workdir, f"rank{rank}.stacks"), "w")
    faulthandler.dump_traceback_later(watchdog_s, exit=True, file=stacks)  # self-destruct if hung
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    if init_method and (ifname := _loopback_ifname()):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", ifname)  # every rank is on this host
    ok = False
    try:
        module_name, qualname = fn_ref.split(":")
        fn = importlib.import_module(module_name)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        args, kwargs = codec.decode(payload)
        if threads and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        if init_method:
            from shardserve.distributed.parallel_state import destroy_distributed, init_distributed

            init_distributed(rank, world_size, init_method, backend, timeout_s=collective_timeout_s)
            value = fn(rank, world_size, *args, **kwargs)
            destroy_distributed()
        else:
            value = fn(rank, world_size, *args, **kwargs)
        data = codec.encode({"ok": True, "value": value})
        ok = True
    except BaseException:
        data = codec.encode({"ok": False, "error": traceback.format_exc()})
    _write_result(os.path.join(workdir, f"rank{rank}.result"), data)
    faulthandler.cancel_dump_traceback_later()
    stacks.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if ok else 1)  # skip interpreter teardown (gloo threads can make it slow)


# --------------------------------------------------------------------------------------- parent side


def _fn_ref(fn: Callable) -> str:
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(f"run_ranks needs a module-level function, got {fn!r}")
    target = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    if target is not fn:
        raise ValueError(f"{module}.{qualname} does not resolve to {fn!r}; define it at module level")
    return f"{module}:{qualname}"


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _outcome(workdir: str, rank: int, proc: mp.process.BaseProcess) -> dict:
    """What rank `rank` reported, or an error describing how it died."""
    try:
        with open(os.path.join(workdir, f"rank{rank}.result"), "rb") as f:
            return codec.decode(f.read())
    except FileNotFoundError:
        stacks = _read(os.path.join(workdir, f"rank{rank}.stacks"))
        if stacks.startswith("Timeout ("):  # faulthandler's watchdog fired: the rank was hung
            return {"ok": False, "hung": True, "error": stacks}
        return {"ok": False, "error": f"exited with code {proc.exitcode} without a result "
                                      f"(killed, crashed or os._exit)\n{stacks}".strip()}
    except Exception as e:
        return {"ok": False, "error": f"unreadable result ({e}); the return value must be msgpack-able"}


def _stop(procs: list) -> None:
    procs = [p for p in procs if p.pid is not None]  # started ones only
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 2.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(2.0)


def _run_once(ref: str, world_size: int, payload: bytes, *, timeout: float, backend: str,
              init: bool, threads: int | None, grace_s: float, workdir: str) -> list[Any]:
    ctx = mp.get_context("spawn")
    init_method = tcp_init_method(get_loopback_ip(), get_free_port()) if init else None
    collective_timeout_s = max(timeout / 2, 1.0)
    watchdog_s = max(timeout - 1.0, 0.5)
    procs = [ctx.Process(target=_rank_main, name=f"rank{rank}",
                         args=(ref, rank, world_size, init_method, backend, collective_timeout_s,
                               watchdog_s, threads, workdir, payload))
             for rank in range(world_size)]
    deadline = time.monotonic() + timeout
    outcomes: dict[int, dict] = {}
    first_failure: float | None = None
    timed_out = False
    try:
        for p in procs:
            p.start()
        while len(outcomes) < world_size:
            for rank, p in enumerate(procs):
                if rank not in outcomes and p.exitcode is not None:
                    outcomes[rank] = _outcome(workdir, rank, p)
                    if not outcomes[rank]["ok"] and first_failure is None:
                        first_failure = time.monotonic()
            if len(outcomes) == world_size:
                break
            now = time.monotonic()
            if first_failure is not None and now - first_failure > grace_s:
                break
            if now >= deadline:
                timed_out = True
                break
            alive = [p.sentinel for r, p in enumerate(procs) if r not in outcomes]
            mp.connection.wait(alive, timeout=min(0.1, max(0.0, deadline - now)))
    finally:
        _stop(procs)

    failed = {r: o["error"] for r, o in sorted(outcomes.items()) if not o["ok"] and not o.get("hung")}
    hung = [r for r, o in sorted(outcomes.items()) if o.get("hung")]
    missing = [r for r in range(world_size) if r not in outcomes]
    if failed:
        for r in hung:
            failed[r] = f"hung; stacks at the watchdog:\n{outcomes[r]['error']}"
        lines = [f"{len(failed)} of {world_size} ranks failed"
                 + (f"; ranks {missing} were still running and were killed" if missing else "")]
        for r, err in failed.items():
            lines.append(f"\n----- rank {r} -----\n{err}")
        raise RankFailure("\n".join(lines))
    if timed_out or hung:
        stuck = sorted(hung + missing)
        lines = [f"ranks {stuck} of {world_size} still running after about {timeout:.0f} s; killed"]
        for r in stuck:
            stacks = _read(os.path.join(workdir, f"rank{r}.stacks")) or "(no stack dump)"
            lines.append(f"\n----- rank {r} stacks -----\n{stacks}")
        raise RankTimeout("\n".join(lines))
    return [outcomes[r]["value"] for r in range(world_size)]


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0,
              backend: str = "gloo", init: bool = True, threads: int | None = 1,
              grace_s: float = 2.0, kwargs: dict | None = None, port_retries: int = 2) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` spawned ranks; return their results.

    See the module docstring for the guarantees. `init=False` skips torch.distributed (plain
    multi-process tests); `threads=None` leaves torch's thread count alone.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ref = _fn_ref(fn)
    payload = codec.encode([list(args), kwargs or {}])
    for attempt in range(port_retries + 1):
        workdir = tempfile.mkdtemp(prefix="ss_ranks_")
        try:
            return _run_once(ref, world_size, payload, timeout=timeout, backend=backend, init=init,
                             threads=threads, grace_s=grace_s, workdir=workdir)
        except RankFailure as e:
            port_lost = init and any(s in str(e) for s in _PORT_IN_USE)
            if not port_lost or attempt == port_retries or isinstance(e, RankTimeout):
                raise
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    raise AssertionError("unreachable")
