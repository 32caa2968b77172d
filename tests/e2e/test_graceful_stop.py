"""Graceful stop of a real `shardserve serve`: the first SIGTERM drains (a stream in flight runs to its end, new
requests get 503 `server_shutting_down`, /health 503 "draining"), then the process exits 0 leaving nothing in
/dev/shm or /tmp; a second SIGTERM stops at once (the stream ends with an error event and [DONE]).

While draining the listener stays open, so a request sent after the SIGTERM gets a 503 rather than a refused
connection; once the last request is done the listener closes (then connections are refused)."""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import time

import httpx
import pytest

from e2e_helpers import MODEL_NAME

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiproc")]

SHM_NAME = re.compile(r"^ss[a-z]{2}_(\d+)_[0-9a-f]+$")  # the pid-named segments (message_queue.OWNED_PREFIXES)


def _descendants(pid: int) -> set[int]:
    """`pid` and every process below it, from /proc (empty where there is none)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        for children in glob.glob(f"/proc/{p}/task/*/children"):
            try:
                with open(children) as f:
                    todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
    return found


def _leftovers(pids: set[int], shm_before: set[str], tmp_before: set[str]) -> list[str]:
    """/dev/shm segments named after one of `pids`, new `ss_*` segments, and new /tmp/shardserve-* entries."""
    shm = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    ours = [n for n in shm if (m := SHM_NAME.match(n)) and int(m.group(1)) in pids]
    new_ss = [n for n in shm - shm_before if n.startswith("ss_")]
    new_tmp = sorted(set(glob.glob("/tmp/shardserve-*")) - tmp_before)
    return sorted(ours + new_ss) + new_tmp


def _snapshot() -> tuple[set[str], set[str]]:
    shm = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    return shm, set(glob.glob("/tmp/shardserve-*"))


def _events(lines) -> list:
    """The data of each server-sent event, JSON-decoded ([DONE] stays a string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=10)


def test_sigterm_drains_the_stream_then_exits_0(start_server):
    shm_before, tmp_before = _snapshot()
    srv = start_server(["--shutdown-grace-s", "60"])
    pids = _descendants(srv.proc.pid)
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 300, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with httpx.Client(timeout=60) as c, c.stream("POST", srv.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = []
        for line in lines:  # wait for the first token: the request is in flight
            got += _events([line])
            if got:
                break
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while "draining" not in srv.log_tail():
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.02)
        # admitted no more: completions and chat get 503 with a JSON error, /health says draining
        r1 = _post(srv.url, "/v1/completions", {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2})
        r2 = _post(srv.url, "/v1/chat/completions",
                   {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        health = srv.health()
        for resp in (r1, r2):
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "server_shutting_down"
            assert "shutting down" in resp.json()["error"]["message"]
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert health.json()["in_flight"] >= 1
        got += _events(lines)  # ... while the stream runs to its end
    assert got[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in got), got[-3:]
    assert got[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in got[:-1] if e["choices"])
    rc = srv.proc.wait(timeout=30)
    log = srv.log_tail()
    assert rc == 0, log
    for phase in ("SIGTERM: draining", "drained: every request finished", "engine replicas stopped",
                  "shardserve: stopped"):
        assert phase in log, log
    assert not _leftovers(pids, shm_before, tmp_before)


def test_second_sigterm_stops_at_once(start_server):
    shm_before, tmp_before = _snapshot()
    # one sequence at a time and 8 prompts in the request: the stream would take far longer than the test
    srv = start_server(["--max-num-seqs", "1"])
    pids = _descendants(srv.proc.pid)
    body = {"model": MODEL_NAME, "prompt": ["Hello"] * 8, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", srv.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = []
        for line in lines:
            got += _events([line])
            if got:
                break
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert srv.proc.poll() is None  # still draining: the stream runs on
        srv.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        try:
            got += _events(lines)  # the stream ends: an error event and [DONE] (or the connection closes)
        except httpx.HTTPError:
            pass
        assert time.monotonic() - t0 < 10
    rc = srv.proc.wait(timeout=max(1.0, 10 - (time.monotonic() - t0)))
    log = srv.log_tail()
    assert time.monotonic() - t0 < 10 and rc == 0, log
    assert got[-1] == "[DONE]" and "shutting down" in got[-2]["error"]["message"], got[-3:]
    finished = [e for e in got if isinstance(e, dict) and e.get("choices") and e["choices"][0].get("finish_reason")]
    assert len(finished) < 8  # cut short
    for phase in ("SIGTERM: draining", "SIGTERM again: stopping now", "request(s) in flight end with an error",
                  "engine replicas stopped", "shardserve: stopped"):
        assert phase in log, log
    assert not _leftovers(pids, shm_before, tmp_before)
