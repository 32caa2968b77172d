"""KV blocks round trip between engines, the core of disaggregated serving: generate part of each request on one
engine, export it (tokens so far and every rank's KV blocks), import it into a *fresh* engine (another executor,
another process group) and decode the rest there. The tokens equal an uninterrupted run, greedy and seeded, at tp 1
and tp 2; written zeros instead of the real blocks do not (the KV is what carries it). Resuming without KV (request
migration: the tokens so far are prefilled again) gives the same tokens and text, penalties and stop strings
included."""
from __future__ import annotations

import pytest
import torch

from checkpoints import engine_llm, prompts_for
from shardserve import SamplingParams
from shardserve.distributed import codec
from shardserve.engine.request_transfer import export_request, import_request, resume_request

PARAMS = {"greedy": SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
          "seeded": SamplingParams(temperature=1.0, top_p=0.95, seed=11, max_tokens=14, ignore_eos=True, n=2)}
SPLIT_AFTER = 5  # output tokens generated on the first engine


def _tokens(outs) -> dict[str, list[list[int]]]:
    return {o.request_id: [c.token_ids for c in o.outputs] for o in outs}


def _run_until(engine, done) -> dict[str, list[list[int]]]:
    final = {}
    while engine.has_unfinished_requests() and not done():
        for o in engine.step():
            if o.finished:
                final[o.request_id] = [c.token_ids for c in o.outputs]
    return final


def _split_run(a, b, prompts, corrupt: bool = False) -> dict[str, list[list[int]]]:
    ea, eb = a.engine, b.engine
    for i, p in enumerate(prompts):
        for name, params in PARAMS.items():
            ea.add_request(f"{name}{i}", prompt_token_ids=p, params=params)
    _run_until(ea, lambda: all(min(s.num_output_tokens for s in r.seqs) >= SPLIT_AFTER
                               for r in ea.requests.values()))
    snaps = []
    for rid in list(ea.requests):
        snap = codec.decode(codec.encode(export_request(ea, rid)))  # as it would cross a process boundary
        ea.abort_request(rid)
        assert all(s.num_computed_tokens == len(p) + len(s.output_token_ids) - 1 for s, p in
                   zip(snap.seqs, [snap.prompt_token_ids] * len(snap.seqs)))
        if corrupt:
            for s in snap.seqs:
                s.kv_blocks = [torch.zeros_like(t) for t in s.kv_blocks]
        snaps.append(snap)
    for snap in snaps:
        import_request(eb, snap)
    return _run_until(eb, lambda: False)


@pytest.mark.parametrize("tp", [1, 2])
def test_request_continues_on_a_fresh_engine(checkpoint, tp):
    path = checkpoint("llama")
    prompts = prompts_for(1000, lengths=(7, 33), seed=3)  # 33 tokens: two full blocks and a partial one
    a = engine_llm(path, tensor_parallel_size=tp)
    try:
        ref = {}
        for name, params in PARAMS.items():
            outs = a.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
            ref.update({f"{name}{i}": [c.token_ids for c in o.outputs] for i, o in enumerate(outs)})
        b = engine_llm(path, tensor_parallel_size=tp)
        try:
            assert b.engine.executor is not a.engine.executor
            got = _split_run(a, b, prompts)
            assert got == ref
            assert b.engine.scheduler.block_manager.num_free_blocks == b.engine.scheduler.block_manager.num_total_blocks
            broken = _split_run(a, b, prompts, corrupt=True)
            assert broken["greedy1"] != ref["greedy1"]
        finally:
            b.shutdown()
    finally:
        a.shutdown()


def test_import_refuses_a_mismatched_layout(checkpoint):
    path = checkpoint("llama")
    a = engine_llm(path)
    b = engine_llm(path, block_size=8)
    try:
        a.engine.add_request("r", prompt_token_ids=[1, 2, 3, 4], params=PARAMS["greedy"])
        _run_until(a.engine, lambda: a.engine.requests["r"].seqs[0].num_output_tokens >= 2)
        snap = export_request(a.engine, "r")
        with pytest.raises(ValueError, match="--block-size must match"):
            import_request(b.engine, snap)
        snap.block_size = 8
        snap.seqs[0].kv_blocks = snap.seqs[0].kv_blocks * 2
        with pytest.raises(ValueError, match="tp x pp must match"):
            import_request(b.engine, snap)
        assert not b.engine.requests  # nothing left behind
    finally:
        a.shutdown()
        b.shutdown()


RESUME_PARAMS = {
    **PARAMS,
    "penalised": SamplingParams(temperature=0.8, seed=3, max_tokens=14, ignore_eos=True, frequency_penalty=1.5,
                                presence_penalty=0.5, repetition_penalty=1.3, n=2),
    "stopped": SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, stop=["e", " t"]),
}


@pytest.mark.parametrize("split", [1, 5])
def test_resume_without_kv_continues_exactly(checkpoint, split):
    """The migration path: what a client got from a replica that died (tokens, text) is all another engine needs;
    the rest of the request equals an uninterrupted run token for token and character for character."""
    path = checkpoint("llama")
    prompts = prompts_for(1000, lengths=(7, 20), seed=5)
    a = engine_llm(path)
    b = engine_llm(path)
    try:
        ref = {}
        for name, params in RESUME_PARAMS.items():
            outs = a.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
            ref.update({f"{name}{i}": [(c.token_ids, c.text) for c in o.outputs] for i, o in enumerate(outs)})
        ea, eb = a.engine, b.engine
        for i, p in enumerate(prompts):
            for name, params in RESUME_PARAMS.items():
                ea.add_request(f"{name}{i}", prompt_token_ids=p, params=params)
        seen: dict[str, list] = {}
        def behind(o) -> bool:
            return not o.finished and min(len(c.token_ids) for c in o.outputs) < split

        while len(seen) < len(ref) or any(behind(o) for o in seen.values()):
            for o in ea.step():
                seen[o.request_id] = o  # cumulative: what a client has
        for rid, o in seen.items():
            ea.abort_request(rid)
            if o.finished:
                continue  # a stop string came first: nothing to resume
            params = RESUME_PARAMS[rid.rstrip("0123456789")]
            resume_request(eb, rid, list(o.prompt_token_ids), params, [list(c.token_ids) for c in o.outputs])
        got = {rid: [(c.token_ids, c.text) for c in o.outputs] for rid, o in seen.items() if o.finished}
        texts_before = {rid: [c.text for c in o.outputs] for rid, o in seen.items()}
        while eb.has_unfinished_requests():
            for o in eb.step():
                if o.finished:
                    got[o.request_id] = [(c.token_ids, c.text) for c in o.outputs]
                    # only new text is reported: the deltas continue the text the client had
                    assert all(c.text.startswith(t) for c, t in zip(o.outputs, texts_before[o.request_id]))
        assert got == ref
        assert eb.scheduler.block_manager.num_free_blocks == eb.scheduler.block_manager.num_total_blocks
    finally:
        a.shutdown()
        b.shutdown()


def test_seeded_draws_are_counter_based():
    """A seeded sample's draw for output position t depends on (seed, t) only: the basis of exact migration."""
    from shardserve.layers.sampler import make_generator, seed_generator, step_seed
    g1, g2 = make_generator(7, "cpu"), make_generator(7, "cpu")
    torch.rand(100, generator=g1)  # draws before do not matter
    a = torch.rand(8, generator=seed_generator(g1, 7, 3))
    b = torch.rand(8, generator=seed_generator(g2, 7, 3))
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.rand(8, generator=seed_generator(g2, 7, 4)))
    assert len({step_seed(s, t) for s in range(50) for t in range(50)}) == 2500
    assert all(0 <= step_seed(s, t) < 1 << 64 for s in (0, (1 << 64) - 1) for t in (0, 10 ** 6))
