"""Failure isolation: a rejected prompt rolls its whole call back, an exception in one step fails only that step's
requests (the engine keeps serving), a lost rank fails one call and the offline LLM restarts its ranks, and the
core process loop survives a step that raises."""
from __future__ import annotations

import pytest
import torch

from checkpoints import engine_llm, prompts_for
from shardserve import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = prompts_for(1000, lengths=(5, 17), seed=11)


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def assert_no_blocks_held(llm) -> None:
    eng = llm.engine
    bm = eng.scheduler.block_manager
    assert not eng.has_unfinished_requests()
    assert not eng.scheduler.running and not eng.scheduler.waiting
    assert bm.num_free_blocks == bm.num_total_blocks


@pytest.fixture(scope="module")
def llama(checkpoint):
    return checkpoint("llama")


@pytest.fixture(scope="module")
def ref(llama):
    """A fresh engine's greedy tokens for PROMPTS and for [7, 8, 9]."""
    llm = engine_llm(llama)
    out = tokens(llm.generate(prompt_token_ids=PROMPTS + [[7, 8, 9]], sampling_params=GREEDY, use_tqdm=False))
    llm.shutdown()
    return {"prompts": out[:2], "789": out[2]}


@pytest.fixture
def oom_once(monkeypatch):
    """Make the in-process worker's next model forward raise a CUDA-style out-of-memory error (once)."""
    def arm(llm):
        runner = llm.engine.executor.worker.runner
        real = runner.forward
        calls = {"n": 0}

        def forward(*args, **kw):
            calls["n"] += 1
            if calls["n"] == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return real(*args, **kw)
        monkeypatch.setattr(runner, "forward", forward)
        return calls
    return arm


def test_rejected_prompt_rolls_back_the_call(llama, ref):
    llm = engine_llm(llama)  # max_model_len 512 (the checkpoint's context): 2058 tokens are too many
    try:
        with pytest.raises(ValueError, match="2058 tokens"):
            llm.generate([[1, 2, 3], [5] * 2058], GREEDY, use_tqdm=False)
        assert_no_blocks_held(llm)
        first = llm.generate([[7, 8, 9]], GREEDY, use_tqdm=False)
        second = llm.generate([[7, 8, 9]], GREEDY, use_tqdm=False)  # used to raise KeyError('3')
        assert [o.prompt_token_ids for o in first] == [[7, 8, 9]]
        assert tokens(first) == tokens(second) == [ref["789"]]
        assert_no_blocks_held(llm)
    finally:
        llm.shutdown()


def test_oom_in_a_step_fails_only_that_batch(llama, ref, oom_once):
    llm = engine_llm(llama, max_num_seqs=1)  # one sequence per step: request a's step fails, b's do not
    try:
        calls = oom_once(llm)
        eng = llm.engine
        eng.add_request("a", params=GREEDY, prompt_token_ids=PROMPTS[0])
        eng.add_request("b", params=GREEDY, prompt_token_ids=PROMPTS[1])
        last = {}
        for _ in range(100):
            if not eng.has_unfinished_requests():
                break
            for o in eng.step():
                last[o.request_id] = o
        assert calls["n"] > 1
        a, b = last["a"], last["b"]
        assert a.finished and a.error.startswith("engine step failed: OutOfMemoryError: CUDA out of memory")
        assert a.outputs[0].finish_reason == "error"
        assert b.error is None and b.finished and b.outputs[0].token_ids == ref["prompts"][1]
        assert_no_blocks_held(llm)
        assert 0 not in eng.executor.worker.runner.states  # a's worker state went with the next step
        assert tokens(llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)) \
            == ref["prompts"]
    finally:
        llm.shutdown()


def test_generate_raises_on_a_failed_step_and_the_next_call_works(llama, ref, oom_once):
    llm = engine_llm(llama)
    try:
        oom_once(llm)
        with pytest.raises(RuntimeError, match="engine step failed: OutOfMemoryError"):
            llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)
        assert_no_blocks_held(llm)
        assert llm.engine.dead is None
        assert tokens(llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)) \
            == ref["prompts"]
    finally:
        llm.shutdown()


def test_error_while_processing_results_fails_that_batch(llama, ref, monkeypatch):
    llm = engine_llm(llama)
    try:
        eng = llm.engine
        real = eng.process_result
        calls = {"n": 0}

        def process_result(*args):
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyError("boom")
            return real(*args)
        monkeypatch.setattr(eng, "process_result", process_result)
        with pytest.raises(RuntimeError, match="engine step failed: KeyError: 'boom'"):
            llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)
        assert_no_blocks_held(llm)
        assert tokens(llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)) \
            == ref["prompts"]
    finally:
        llm.shutdown()


def test_lost_rank_fails_one_call_then_the_llm_restarts_its_ranks(llama):
    llm = engine_llm(llama, tensor_parallel_size=2)
    try:
        first = tokens(llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False))
        victim = llm.engine.executor.procs[1]
        victim.kill()
        victim.wait()
        with pytest.raises(RuntimeError, match=r"rank 1 .*(exit|died)"):
            llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)
        assert llm.engine.dead
        again = tokens(llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False))
        assert llm.engine.dead is None
        assert all(p.poll() is None for p in llm.engine.executor.procs)
        assert victim.pid not in [p.pid for p in llm.engine.executor.procs]
        assert again == first
        assert_no_blocks_held(llm)
    finally:
        llm.shutdown()


# --- the core process loop ---------------------------------------------------------------------------------------
class FakeChannel:
    """Feeds serve() request "a", then (once the engine is idle) request "b", then hangs up."""

    def __init__(self, engine) -> None:
        self.engine, self.sent, self.stage = engine, [], 0

    def send(self, msg) -> None:
        self.sent.append(msg)

    def poll(self, timeout):
        if self.engine.has_unfinished_requests():
            return []
        self.stage += 1
        if self.stage <= 2:
            rid, prompt = ("a", PROMPTS[0]) if self.stage == 1 else ("b", PROMPTS[1])
            return [{"t": "add", "id": rid, "prompt_token_ids": prompt, "params": GREEDY}]
        return None

    def results(self) -> dict:
        """request id → (error, token ids, finished)"""
        res: dict = {}
        for msg in self.sent:
            for d in msg.get("outs", []) if msg["t"] == "outs" else []:
                err, ids, fin = res.get(d.request_id, (None, [], False))
                res[d.request_id] = (err or d.error, ids + list(d.outputs[0].token_ids), fin or d.finished)
        return res


@pytest.mark.parametrize("where", ["forward", "step"])
def test_core_loop_keeps_serving_after_a_failed_step(llama, ref, oom_once, monkeypatch, where):
    from shardserve.engine.core_proc import serve
    llm = engine_llm(llama)
    try:
        eng = llm.engine
        if where == "forward":
            oom_once(llm)
        else:  # an exception that escapes step() itself: serve() fails the step's requests
            real, calls = eng.step, {"n": 0}

            def step():
                calls["n"] += 1
                if calls["n"] == 1:
                    raise RuntimeError("scheduler bug")
                return real()
            monkeypatch.setattr(eng, "step", step)
        chan = FakeChannel(eng)
        assert serve(eng, chan) == 0
        acks = [m for m in chan.sent if m["t"] == "ack"]
        assert [(m["id"], m["error"]) for m in acks] == [("a", None), ("b", None)]
        res = chan.results()
        err, _, fin = res["a"]
        assert fin and err.startswith("engine step failed: " + ("OutOfMemoryError" if where == "forward"
                                                                   else "RuntimeError: scheduler bug"))
        assert res["b"] == (None, ref["prompts"][1], True)
        assert not any(m["t"] == "dead" for m in chan.sent)
        assert_no_blocks_held(llm)
    finally:
        llm.shutdown()


def test_an_undecodable_add_is_refused_and_the_channel_goes_on(llama, ref):
    """Over the real socket channel: an add whose params a SamplingParams refuses (it was changed after validation,
    or a peer bug) does not decode; the core answers that one request with an error ack, and the next request on the
    same channel is served normally."""
    import socket
    import threading

    import msgpack

    from shardserve.distributed import codec
    from shardserve.engine.core_proc import _Channel, serve
    llm = engine_llm(llama)
    a, b = socket.socketpair()
    try:
        bad = msgpack.packb({"t": "add", "id": "bad", "prompt_token_ids": PROMPTS[0],
                             "params": msgpack.ExtType(codec.EXT_OBJECT, msgpack.packb(
                                 ["SamplingParams", {"temperature": -1.0}]))})
        b.sendall(len(bad).to_bytes(4, "little") + bad + codec.encode_frame(
            {"t": "add", "id": "good", "prompt_token_ids": PROMPTS[1], "params": GREEDY}))
        done: dict = {}

        def run() -> None:
            try:
                done["rc"] = serve(llm.engine, _Channel(a))
            except (BrokenPipeError, ConnectionResetError):  # as run_core: the parent hung up while we wrote
                done["rc"] = 0
        core = threading.Thread(target=run, daemon=True)
        core.start()
        dec, msgs = codec.FrameDecoder(), []
        b.settimeout(60)
        while not any(m.get("t") == "outs" and any(d.request_id == "good" and d.finished for d in m["outs"])
                      for m in msgs):
            dec.feed(b.recv(1 << 20))
            msgs.extend(dec)
        acks = {m["id"]: m["error"] for m in msgs if m.get("t") == "ack"}
        assert acks["good"] is None
        assert acks["bad"].startswith("the request could not be decoded") and "temperature" in acks["bad"]
        ids = [t for m in msgs if m.get("t") == "outs" for d in m["outs"] if d.request_id == "good"
               for t in d.outputs[0].token_ids]
        assert ids == ref["prompts"][1]
        b.close()
        core.join(10)
        assert done.get("rc") == 0
        assert_no_blocks_held(llm)
    finally:
        a.close()
        b.close()
        llm.shutdown()
