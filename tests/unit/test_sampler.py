"""Sampler: greedy, penalties, top-k/p, min-p, temperature, seeds, bans, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from shardserve.layers import sampler as sampler_mod
from shardserve.layers.sampler import (Sampler, SamplingMetadata, compute_prompt_logprobs,
                                       make_generator)
from shardserve.sampling_params import SamplingParams

SAMPLER = Sampler()


def build(params: list[SamplingParams], vocab: int, prompt: list[list[int]] | None = None,
          output: list[list[int]] | None = None, gens: list | None = None,
          eos: tuple[int, ...] = (0,)) -> SamplingMetadata:
    b = len(params)
    return SamplingMetadata.build(params, prompt or [[] for _ in range(b)],
                                  output or [[] for _ in range(b)], gens or [None] * b,
                                  list(eos), vocab, "cpu")


def sample(logits: torch.Tensor, params: list[SamplingParams], **kw) -> list[int]:
    return SAMPLER(logits, build(params, logits.shape[-1], **kw)).token_ids


def draw_many(logits_row: torch.Tensor, p: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """n i.i.d. samples of one row: a batch of n copies, unseeded rows, global RNG seeded."""
    torch.manual_seed(seed)
    toks = sample(logits_row.expand(n, -1).contiguous(), [p] * n)
    return torch.tensor(toks)


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    assert counts[expected == 0].sum() == 0, "sampled a token with zero probability"
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# chi-square critical values at p = 0.001
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32}

# -- greedy ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50).to(dtype)
    assert sample(logits, [SamplingParams(temperature=0.0)] * 6) == \
        logits.float().argmax(-1).tolist()


def test_greedy_ties_take_lowest_index() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    assert sample(logits, [SamplingParams(temperature=0.0)] * 2) == [1, 0]
    # the non-fast path (penalties on) keeps the rule
    p = SamplingParams(temperature=0.0, presence_penalty=0.1)
    assert sample(logits, [p, p], output=[[3], [3]]) == [1, 0]


def test_all_greedy_fast_path_skips_sort_and_topk(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("fast path must not sort")
    monkeypatch.setattr(torch.Tensor, "sort", boom)
    monkeypatch.setattr(torch.Tensor, "topk", boom)
    logits = torch.randn(3, 20)
    # top-k / top-p / min-p on greedy rows are irrelevant and must not trigger the work
    params = [SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.3)] * 3
    meta = build(params, 20)
    assert meta.all_greedy and meta.no_penalties and meta.no_top_k and meta.no_top_p
    assert SAMPLER(logits, meta).token_ids == logits.argmax(-1).tolist()


def test_top_k_never_sorts_the_vocab(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.Tensor, "sort", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    assert sample(logits, [SamplingParams(top_k=1)] * 4) == logits.argmax(-1).tolist()
    assert sample(logits, [SamplingParams(top_k=1, top_p=0.9)] * 4) == logits.argmax(-1).tolist()


def test_input_logits_are_not_modified() -> None:
    logits = torch.randn(3, 10)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, min_tokens=2, top_k=3,
                             top_p=0.8, min_p=0.1, temperature=0.5)] * 3
    sample(logits, params, prompt=[[1, 2]] * 3, output=[[3]] * 3)
    assert torch.equal(logits, before)


def test_mixed_batch_greedy_rows_still_argmax() -> None:
    torch.manual_seed(2)
    logits = torch.randn(5, 40)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5),
              SamplingParams(temperature=0.0), SamplingParams(top_k=1),
              SamplingParams(temperature=0.0)]
    toks = sample(logits, params)
    ref = logits.argmax(-1).tolist()
    assert [toks[i] for i in (0, 2, 3, 4)] == [ref[i] for i in (0, 2, 3, 4)]


def test_empty_batch_and_bad_shapes() -> None:
    out = SAMPLER(torch.empty(0, 8), build([], 8))
    assert out.token_ids == [] and out.logprobs == []
    with pytest.raises(ValueError, match="vocab_size 8"):
        SAMPLER(torch.randn(1, 10), build([SamplingParams()], 8))
    with pytest.raises(ValueError, match="one entry per row"):
        SamplingMetadata.build([SamplingParams()], [], [[]], [None], [0], 8, "cpu")

# -- penalties -------------------------------------------------------------------------------------


def test_penalties_match_hand_computed_reference() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0],
                           [2.0, -1.0, 0.5, 3.0, -2.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5,
                             frequency_penalty=0.25),
              SamplingParams(temperature=0.0)]  # no penalties on this row
    meta = build(params, 5, prompt=[[0, 1], [0, 1]], output=[[3, 3, 4], [3, 3, 4]])
    got = sampler_mod._apply_penalties(logits.clone(), meta)
    # token 0: prompt, positive: 2 / 2 = 1
    # token 1: prompt, negative: -1 * 2 = -2
    # token 2: unseen: 0.5
    # token 3: output x2, positive: 3 / 2 - 0.25 * 2 - 0.5 = 0.5
    # token 4: output x1, negative: -2 * 2 - 0.25 - 0.5 = -4.75
    expected = torch.tensor([[1.0, -2.0, 0.5, 0.5, -4.75], [2.0, -1.0, 0.5, 3.0, -2.0]])
    torch.testing.assert_close(got, expected)


def reference_penalties(logits: torch.Tensor, prompt: list[int], output: list[int],
                        rep: float, pres: float, freq: float) -> torch.Tensor:
    out = logits.clone()
    for t in range(out.numel()):
        if t in prompt or t in output:
            out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
        c = output.count(t)
        out[t] -= freq * c + (pres if c else 0.0)
    return out


def test_penalties_random_against_loop_reference() -> None:
    g = torch.Generator().manual_seed(3)
    vocab = 30
    logits = torch.randn(4, vocab, generator=g) * 3
    prompts = [[1, 2, 2, 29], [], [5], [0, 7, 7, 7]]
    outputs = [[2, 3, 3, 3], [4], [], [7, 8, 29]]
    knobs = [(1.3, 0.2, 0.7), (0.8, -0.5, 1.5), (1.0, 1.0, 0.0), (2.0, 0.0, -1.0)]
    params = [SamplingParams(temperature=0.0, repetition_penalty=r, presence_penalty=p,
                             frequency_penalty=f) for r, p, f in knobs]
    meta = build(params, vocab, prompt=prompts, output=outputs)
    got = sampler_mod._apply_penalties(logits, meta)
    for i, (r, p, f) in enumerate(knobs):
        ref = reference_penalties(logits[i], prompts[i], outputs[i], r, p, f)
        torch.testing.assert_close(got[i], ref)
        # end to end, greedy takes the argmax of the penalised logits
    assert SAMPLER(logits, meta).token_ids == got.argmax(-1).tolist()


def test_presence_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]])
    assert sample(logits, [SamplingParams(temperature=0.0)], output=[[0]]) == [0]
    assert sample(logits, [SamplingParams(temperature=0.0, presence_penalty=0.5)],
                  output=[[0]]) == [1]
    # repetition penalty looks at the prompt too; presence/frequency do not
    assert sample(logits, [SamplingParams(temperature=0.0, repetition_penalty=1.2)],
                  prompt=[[0]]) == [1]
    assert sample(logits, [SamplingParams(temperature=0.0, frequency_penalty=2.0)],
                  prompt=[[0]]) == [0]

# -- top-k / top-p / min-p / temperature -----------------------------------------------------------


def test_top_k_1_equals_greedy() -> None:
    torch.manual_seed(4)
    logits = torch.randn(8, 100)
    for temp in (0.3, 1.0, 5.0):
        assert sample(logits, [SamplingParams(temperature=temp, top_k=1)] * 8) == \
            logits.argmax(-1).tolist()


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    torch.manual_seed(5)
    logits = torch.randn(8, 100) * 0.1  # nearly flat: without top-p anything goes
    assert sample(logits, [SamplingParams(temperature=2.0, top_p=1e-6)] * 8) == \
        logits.argmax(-1).tolist()


PROBS = torch.tensor([0.4, 0.2, 0.1, 0.079, 0.071, 0.05, 0.05, 0.05])
LOGITS = PROBS.log()


def test_top_k_support_and_distribution() -> None:
    toks = draw_many(LOGITS, SamplingParams(top_k=3), 6000)
    assert set(toks.tolist()) == {0, 1, 2}
    expected = torch.tensor([4, 2, 1, 0, 0, 0, 0, 0]) / 7
    assert chi_square(toks, expected) < CHI2_CRIT[2]


def test_top_p_support_and_distribution() -> None:
    toks = draw_many(LOGITS, SamplingParams(top_p=0.55), 6000)  # 0.4 + 0.2 reaches 0.55
    assert set(toks.tolist()) == {0, 1}
    assert chi_square(toks, torch.tensor([2, 1, 0, 0, 0, 0, 0, 0]) / 3) < CHI2_CRIT[1]


def test_top_k_and_top_p_together() -> None:
    # top-k=4 renormalises to 0.4/0.779 = 0.513, 0.257, ...; top-p 0.7 then keeps the first two
    toks = draw_many(LOGITS, SamplingParams(top_k=4, top_p=0.7), 3000)
    assert set(toks.tolist()) == {0, 1}


def test_top_k_keeps_ties_at_the_kth_value() -> None:
    logits = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.0])
    assert set(draw_many(logits, SamplingParams(top_k=2), 2000).tolist()) == {0, 1, 2}
    assert set(draw_many(logits, SamplingParams(top_k=2, top_p=0.999), 2000).tolist()) == {0, 1, 2}


def test_per_row_settings_in_one_batch() -> None:
    n = 1500
    params = [SamplingParams(top_k=3), SamplingParams(top_p=0.55), SamplingParams(min_p=0.2),
              SamplingParams(top_k=2, top_p=0.999), SamplingParams(temperature=0.0),
              SamplingParams()]
    torch.manual_seed(3)
    logits = LOGITS.expand(n * len(params), -1).contiguous()
    toks = torch.tensor(sample(logits, params * n)).view(n, len(params))  # [n, rows]
    supports = [set(toks[:, i].tolist()) for i in range(len(params))]
    assert supports == [{0, 1, 2}, {0, 1}, {0, 1, 2}, {0, 1}, {0}, set(range(8))]


def test_min_p_support_and_distribution() -> None:
    # threshold 0.2 * 0.4 = 0.08: tokens 0, 1, 2 stay; 0.079 and below go
    toks = draw_many(LOGITS, SamplingParams(min_p=0.2), 6000)
    assert set(toks.tolist()) == {0, 1, 2}
    assert chi_square(toks, torch.tensor([4, 2, 1, 0, 0, 0, 0, 0]) / 7) < CHI2_CRIT[2]
    # min_p is relative to the max probability after temperature: at T=2 the probabilities
    # are sqrt-flattened (0.632 : 0.447 : 0.316 : 0.281 : ...), so 0.5 keeps tokens 0, 1 and 2
    toks = draw_many(LOGITS, SamplingParams(min_p=0.5, temperature=2.0), 3000)
    assert set(toks.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_shapes_the_distribution(temperature: float) -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    toks = draw_many(logits, SamplingParams(temperature=temperature), 20000)
    expected = torch.softmax(logits / temperature, -1)
    assert chi_square(toks, expected) < CHI2_CRIT[5]
    # and the check has teeth: the distribution at another temperature is rejected
    other = torch.softmax(logits / (temperature * 1.5), -1)
    assert chi_square(toks, other) > 100


def test_seeded_generator_rows_sample_the_right_distribution() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    n = 8000
    g = make_generator(123, "cpu")
    meta = build([SamplingParams(temperature=0.7, seed=123)] * n, 6, gens=[g] * n)
    toks = torch.tensor(SAMPLER(logits.expand(n, -1).contiguous(), meta).token_ids)
    assert chi_square(toks, torch.softmax(logits / 0.7, -1)) < CHI2_CRIT[5]

# -- seeds -----------------------------------------------------------------------------------------


VOCAB = 500


def seeded_run(seed: int, position: int, neighbours: list[SamplingParams],
               neighbour_seeds: list[int | None], target: SamplingParams,
               steps: int = 6) -> list[int]:
    """Tokens of the seeded target row over `steps` steps, placed at `position` among neighbours."""
    g = torch.Generator().manual_seed(999)
    target_logits = torch.randn(steps, VOCAB, generator=g) * 0.5  # nearly flat: seeds matter
    gen = make_generator(seed, "cpu")
    others = [make_generator(s, "cpu") if s is not None else None for s in neighbour_seeds]
    out = []
    for step in range(steps):
        params = list(neighbours)
        params.insert(position, target)
        gens = list(others)
        gens.insert(position, gen)
        logits = torch.randn(len(params), VOCAB) * 3  # neighbours' logits: anything
        logits[position] = target_logits[step]
        out.append(SAMPLER(logits, build(params, VOCAB, gens=gens)).token_ids[position])
    return out


@pytest.mark.parametrize("target", [
    SamplingParams(temperature=1.0, seed=7),
    SamplingParams(temperature=0.8, top_p=0.95, min_p=0.01, seed=7),
    SamplingParams(temperature=1.2, top_k=200, seed=7),
])
def test_same_seed_same_tokens_whatever_the_batch(target: SamplingParams) -> None:
    alone = seeded_run(7, 0, [], [], target)
    unseeded_neighbours = [SamplingParams(), SamplingParams(top_k=5),
                           SamplingParams(temperature=0.0), SamplingParams(top_p=0.3)]
    at_3 = seeded_run(7, 3, unseeded_neighbours, [None] * 4, target)
    seeded_neighbours = [SamplingParams(seed=1), SamplingParams(seed=2, min_p=0.2),
                         SamplingParams(temperature=0.0, seed=3), SamplingParams(seed=4)]
    with_seeded = seeded_run(7, 1, seeded_neighbours, [1, 2, 3, 4], target)
    assert alone == at_3 == with_seeded
    assert len(set(alone)) > 1  # the generator advances from step to step
    assert seeded_run(8, 0, [], [], target) != alone


def test_unseeded_draw_does_not_consume_seeded_generators() -> None:
    gen = make_generator(5, "cpu")
    state = gen.get_state()
    sample(torch.randn(2, 50), [SamplingParams(temperature=0.0, seed=5), SamplingParams()],
           gens=[gen, None])
    assert torch.equal(gen.get_state(), state)  # greedy rows draw nothing

# -- banned tokens (min_tokens) --------------------------------------------------------------------


def test_min_tokens_bans_eos_and_stop_ids_until_reached() -> None:
    vocab = 10
    logits = torch.zeros(1, vocab)
    logits[0, 0] = 10.0  # EOS
    logits[0, 5] = 9.0  # stop token
    p = SamplingParams(min_tokens=3, stop_token_ids=[5, 42])  # 42: outside the vocab, dropped
    for produced in range(3):
        meta = build([p], vocab, output=[[7] * produced], eos=(0,))
        assert meta.banned_token_ids == [[0, 5]]
        assert SAMPLER(logits, build([p.clone()], vocab, output=[[7] * produced])).token_ids[0] \
            not in (0, 5)
        greedy = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5])
        assert sample(logits, [greedy], output=[[7] * produced]) == [1]  # first unbanned max
    # random rows: never sampled over many draws, even at a high temperature
    n = 2000
    torch.manual_seed(0)
    toks = sample(logits.expand(n, -1).contiguous(), [SamplingParams(min_tokens=3,
                  stop_token_ids=[5], temperature=3.0)] * n)
    assert not {0, 5} & set(toks)
    # once min_tokens are out, nothing is banned
    meta = build([p], vocab, output=[[7, 7, 7]])
    assert meta.banned_token_ids == [[]] and meta.banned_index is None
    assert SAMPLER(logits, build([SamplingParams(temperature=0.0, min_tokens=3)], vocab,
                                 output=[[7, 7, 7]])).token_ids == [0]


def test_ignore_eos_does_not_ban_eos() -> None:
    p = SamplingParams(min_tokens=2, stop_token_ids=[3], ignore_eos=True)
    assert build([p], 10, eos=(0, 1)).banned_token_ids == [[3]]
    q = SamplingParams(min_tokens=2)
    assert build([q], 10, eos=(0, 1)).banned_token_ids == [[0, 1]]

# -- logprobs --------------------------------------------------------------------------------------


def test_logprobs_are_raw_and_ranked() -> None:
    torch.manual_seed(6)
    vocab = 64
    logits = torch.randn(4, vocab) * 2
    params = [SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=1.5),
              SamplingParams(temperature=3.0, logprobs=3, presence_penalty=1.0),
              SamplingParams(temperature=0.5, top_k=10),  # no logprobs
              SamplingParams(temperature=2.0, logprobs=0, frequency_penalty=-1.0)]
    meta = build(params, vocab, prompt=[[1, 2]] * 4, output=[[3, 4]] * 4)
    out = SAMPLER(logits, meta)
    raw = torch.log_softmax(logits, -1)
    assert out.logprobs[2] is None
    for i, k in ((0, 5), (1, 3), (3, 0)):
        lp = out.logprobs[i]
        assert lp is not None and lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(raw[i, lp.token_id].item(), abs=1e-5)
        assert lp.rank == int((raw[i] > raw[i, lp.token_id]).sum()) + 1
        sorted_ids = raw[i].argsort(descending=True).tolist()
        assert lp.rank == sorted_ids.index(lp.token_id) + 1  # no ties with random logits
        assert len(lp.top_token_ids) == len(lp.top_logprobs) == k
        assert lp.top_token_ids == sorted_ids[:k]
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
        torch.testing.assert_close(torch.tensor(lp.top_logprobs), raw[i, sorted_ids[:k]])


def test_logprobs_rank_of_greedy_token_is_one_and_bf16_input() -> None:
    torch.manual_seed(7)
    logits = torch.randn(2, 32).to(torch.bfloat16)
    out = SAMPLER(logits, build([SamplingParams(temperature=0.0, logprobs=2)] * 2, 32))
    raw = torch.log_softmax(logits.float(), -1)
    for i in range(2):
        assert out.logprobs[i].rank == 1
        assert out.logprobs[i].top_token_ids[0] == out.token_ids[i]
        assert out.logprobs[i].logprob == pytest.approx(raw[i].max().item(), abs=1e-6)


def reference_prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[tuple]:
    out = []
    for row, t in zip(logits.tolist(), targets):
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        lps = [v - lse for v in row]
        order = sorted(range(len(lps)), key=lambda j: -lps[j])
        out.append((t, lps[t], order.index(t) + 1, order[:k], [lps[j] for j in order[:k]]))
    return out


@pytest.mark.parametrize("k", [0, 1, 4])
def test_compute_prompt_logprobs_against_reference(k: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampler_mod, "_PROMPT_LOGPROBS_CHUNK_ELEMS", 3 * 40)  # 3 rows per chunk
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(10, 40, generator=g) * 3
    targets = torch.randint(0, 40, (10,), generator=g)
    got = compute_prompt_logprobs(logits, targets, k)
    ref = reference_prompt_logprobs(logits, targets.tolist(), k)
    assert len(got) == 10
    for tl, (t, lp, rank, ids, vals) in zip(got, ref):
        assert tl.token_id == t and tl.rank == rank and tl.top_token_ids == ids
        assert tl.logprob == pytest.approx(lp, abs=1e-5)
        assert tl.top_logprobs == pytest.approx(vals, abs=1e-5)


def test_compute_prompt_logprobs_bad_input() -> None:
    with pytest.raises(ValueError, match="targets"):
        compute_prompt_logprobs(torch.randn(3, 5), torch.tensor([1, 2]), 1)
    with pytest.raises(ValueError, match="k must be >= 0"):
        compute_prompt_logprobs(torch.randn(2, 5), torch.tensor([1, 2]), -1)
    assert compute_prompt_logprobs(torch.randn(0, 5), torch.zeros(0, dtype=torch.int64), 2) == []
