"""Offline data parallelism for `LLM(data_parallel_size=N)`: N engine-core processes, each request sent to the
least-loaded one, and step() gathering whatever outputs any of them has produced."""
from __future__ import annotations

import logging
import secrets
import select
import socket
import subprocess
import time
from dataclasses import replace
from typing import Any

from shardserve.engine.args import EngineArgs
from shardserve.engine.core_proc import (RECV_BYTES, OutputAccumulator, core_threads, launch_core, new_unpacker,
                                         pack, tokens_match)
from shardserve.engine.llm_engine import EngineDeadError, load_tokenizer, validate_request
from shardserve.entrypoints.router import ReplicaLoad, core_engine_args, pick_replica
from shardserve.outputs import RequestOutput
from shardserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0
POLL_S = 0.05   # step() waits at most this long for an output before returning an empty list


class _Core:
    """One replica seen from the driver: its process, blocking socket and load."""

    def __init__(self, index: int, proc: subprocess.Popen, token: str) -> None:
        self.index, self.proc, self.token = index, proc, token
        self.sock: socket.socket | None = None
        self.unpacker = new_unpacker()
        self.ready = False
        self.dead: str | None = None
        self.requests: dict[str, int] = {}     # request id → outstanding tokens
        self.num_assigned = 0

    def send(self, msg: dict[str, Any]) -> None:
        assert self.sock is not None
        self.sock.sendall(pack(msg))

    def read(self) -> list[dict] | None:
        assert self.sock is not None
        data = self.sock.recv(RECV_BYTES)
        if not data:
            return None
        self.unpacker.feed(data)
        return list(self.unpacker)


class DataParallelEngines:
    """The engine interface LLM uses (tokenizer, cfg, add_request, step, abort_request, shutdown) over N cores."""

    def __init__(self, args: EngineArgs, progress: bool = True) -> None:
        model = args.resolve_model(progress)
        self.cfg = replace(args, model=model, data_parallel_size=1).create_config(progress)  # replica 0's config
        self.tokenizer = load_tokenizer(self.cfg.model.tokenizer)
        n = args.data_parallel_size
        core_args = core_engine_args(args, self.cfg.model.max_model_len, model)
        threads = core_threads(n)
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        self.cores: list[_Core] = []
        self._acc = OutputAccumulator()
        self._owner: dict[str, _Core] = {}
        self._failed: list[RequestOutput] = []
        try:
            for i in range(n):
                token = secrets.token_hex(16)
                self.cores.append(_Core(i, launch_core(core_args, i, port, token, threads), token))
            self._start(listener)
        except BaseException:
            self.shutdown()
            raise
        finally:
            listener.close()

    # --- start-up ------------------------------------------------------------------------------------------
    def _start(self, listener: socket.socket) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        pending: dict[socket.socket, bytes] = {}
        while not all(c.ready for c in self.cores):
            for c in self.cores:
                if c.proc.poll() is not None:
                    raise RuntimeError(f"engine core {c.index} exited with code {c.proc.returncode} during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError(f"engine cores not ready within {START_TIMEOUT_S:.0f} s")
            socks = [listener] + list(pending) + [c.sock for c in self.cores if c.sock is not None]
            readable, _, _ = select.select(socks, [], [], 0.2)
            for s in readable:
                if s is listener:
                    conn, _ = listener.accept()
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    pending[conn] = b""
                elif s in pending:
                    self._hello(s, pending)
                else:
                    core = next(c for c in self.cores if c.sock is s)
                    for msg in core.read() or []:
                        if msg.get("t") == "failed":
                            raise RuntimeError(f"engine core {core.index} failed to start: {msg.get('error')}")
                        if msg.get("t") == "ready":
                            core.ready = True

    def _hello(self, conn: socket.socket, pending: dict[socket.socket, bytes]) -> None:
        data = conn.recv(RECV_BYTES)
        if not data:
            pending.pop(conn, None)  # closed before saying hello
            conn.close()
            return
        unpacker = new_unpacker()
        unpacker.feed(pending[conn] + data)
        msgs = list(unpacker)
        if not msgs:
            pending[conn] += data
            return
        del pending[conn]
        core = next((c for c in self.cores if c.sock is None and tokens_match(c.token, msgs[0].get("token"))), None)
        if core is None or msgs[0].get("t") != "hello":
            conn.close()  # a stranger on our port
            return
        core.sock = conn
        for msg in msgs[1:]:
            if msg.get("t") == "ready":
                core.ready = True

    # --- the engine interface ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None) -> None:
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("either prompt or prompt_token_ids is required")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt_token_ids]
        max_tokens = self._validate(ids, params)
        loads = [ReplicaLoad(c.ready and not c.dead, sum(c.requests.values()), len(c.requests)) for c in self.cores]
        i = pick_replica(loads)
        if i is None:
            raise EngineDeadError("every engine core has died: " + "; ".join(str(c.dead) for c in self.cores))
        core = self.cores[i]
        self._acc.add(request_id, prompt, ids, params.n, params.logprobs is not None)
        core.send({"t": "add", "id": request_id, "prompt_token_ids": ids, "params": params.to_dict()})
        core.requests[request_id] = len(ids) + max_tokens * params.n
        core.num_assigned += 1
        self._owner[request_id] = core

    def _validate(self, ids: list[int], params: SamplingParams) -> int:
        """The engine's own checks, here so that a bad prompt raises at add time as with one engine."""
        return validate_request(ids, params, self.cfg.model.max_model_len, self.cfg.model.vocab_size)

    def abort_request(self, request_id: str) -> None:
        core = self._owner.pop(request_id, None)
        self._acc.drop(request_id)
        if core is not None and not core.dead:
            core.requests.pop(request_id, None)
            core.send({"t": "abort", "ids": [request_id]})

    def has_unfinished_requests(self) -> bool:
        return bool(self._owner) or bool(self._failed)

    def step(self) -> list[RequestOutput]:
        """Outputs any core has produced (waits up to POLL_S for the first one); failed requests carry .error."""
        outs, self._failed = self._failed, []
        live = [c for c in self.cores if c.sock is not None and not c.dead and c.requests]
        if not live:
            return outs
        readable, _, _ = select.select([c.sock for c in live], [], [], 0 if outs else POLL_S)
        for core in live:
            if core.sock not in readable:
                continue
            try:
                msgs = core.read()
            except OSError:
                msgs = None
            if msgs is None:
                code = core.proc.poll()
                self._core_died(core, f"engine core {core.index} exited with code {code}", outs)
                continue
            for msg in msgs:
                self._handle(core, msg, outs)
        return outs

    def _handle(self, core: _Core, msg: dict, outs: list[RequestOutput]) -> None:
        kind = msg.get("t")
        if kind == "outs":
            for d in msg["outs"]:
                out = self._acc.decode(d)
                if out is None:
                    continue
                if out.finished or out.error:
                    core.requests.pop(out.request_id, None)
                    self._owner.pop(out.request_id, None)
                else:
                    core.requests[out.request_id] = max(0, core.requests.get(out.request_id, 0)
                                                        - sum(len(c.token_ids_delta) for c in out.outputs))
                outs.append(out)
        elif kind == "ack" and msg.get("error"):
            fail = self._acc.fail(msg["id"], msg["error"])
            core.requests.pop(msg["id"], None)
            self._owner.pop(msg["id"], None)
            if fail is not None:
                outs.append(fail)
        elif kind == "dead":
            self._core_died(core, f"engine core {core.index}: {msg.get('reason')}", outs)

    def _core_died(self, core: _Core, reason: str, outs: list[RequestOutput]) -> None:
        core.dead = reason
        logger.error("%s", reason)
        for rid in list(core.requests):
            self._owner.pop(rid, None)
            fail = self._acc.fail(rid, reason)
            if fail is not None:
                outs.append(fail)
        core.requests.clear()

    @property
    def requests_per_replica(self) -> list[int]:
        return [c.num_assigned for c in self.cores]

    def shutdown(self) -> None:
        for c in getattr(self, "cores", []):
            if c.sock is not None and c.proc.poll() is None:
                try:
                    c.send({"t": "shutdown"})
                except OSError:
                    pass
        for c in getattr(self, "cores", []):
            try:
                c.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
            if c.sock is not None:
                c.sock.close()
        self.cores = []
