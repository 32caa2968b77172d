"""Sampler: a step's logits -> next tokens (penalties, temperature, top-k/p, min-p, seeds)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from shardserve.sampling_params import SamplingParams

# compute_prompt_logprobs works on at most this many logits at a time (16 Mi floats = 64 MiB).
_PROMPT_LOGPROBS_CHUNK_ELEMS = 1 << 24


_MASK64 = (1 << 64) - 1


def step_seed(seed: int, position: int) -> int:
    """The seed of a seeded sample's draw for its `position`-th output token (splitmix64 of both).

    Draws are counter-based: a sample's token at position t depends only on (seed, t) and its logits, never on
    how many draws came before or on which engine made them. So a request moved to another replica and
    re-prefilled there (migration), or recomputed after preemption, continues exactly where it was."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A per-sample generator; `seed_generator` re-seeds it for each output position before its draw."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(seed & _MASK64)
    return g


def seed_generator(g: torch.Generator, seed: int, position: int) -> torch.Generator:
    g.manual_seed(step_seed(seed, position))
    return g


def _pad(rows: list[list[int]], pad: int, device: torch.device | str) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    padded = [r + [pad] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.int64, device=device).view(len(rows), width)  # [B, L]


@dataclass
class SamplingMetadata:
    """Per-row sampling settings as tensors on the logits' device, built once per step."""

    temperature: Tensor  # [B] float32; greedy rows (SamplingParams.greedy) keep their raw value
    top_k: Tensor  # [B] int64, vocab_size where disabled
    top_p: Tensor  # [B] float32
    min_p: Tensor  # [B] float32
    presence_penalty: Tensor  # [B] float32
    frequency_penalty: Tensor  # [B] float32
    repetition_penalty: Tensor  # [B] float32
    all_greedy: bool
    all_random: bool
    no_penalties: bool
    no_top_k: bool  # flags about top-k / top-p / min-p look at random rows only
    no_top_p: bool
    no_min_p: bool
    generators: dict[int, torch.Generator]  # row -> the request's generator (seeded requests)
    prompt_token_ids: Tensor | None  # [B, Lp] int64 padded with vocab_size; None: no repetition
    output_token_ids: Tensor | None  # [B, Lo] int64 padded with vocab_size; None if no_penalties
    banned_token_ids: list[list[int]]  # per row: tokens forbidden this step
    num_logprobs: list[int | None]
    vocab_size: int
    greedy_mask: Tensor  # [B] bool
    banned_index: tuple[Tensor, Tensor] | None = None  # (rows [N], token ids [N]) of all bans
    logprob_rows: list[int] = field(default_factory=list)  # rows with num_logprobs not None

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_token_ids: list[list[int]],
              output_token_ids: list[list[int]], generators: list[torch.Generator | None] | None,
              eos_token_ids: list[int], vocab_size: int,
              device: torch.device | str) -> "SamplingMetadata":
        b = len(params)
        if generators is None:
            generators = [None] * b
        if not len(prompt_token_ids) == len(output_token_ids) == len(generators) == b:
            raise ValueError(
                f"SamplingMetadata.build: params ({b}), "
                f"prompt_token_ids ({len(prompt_token_ids)}), "
                f"output_token_ids ({len(output_token_ids)}) and generators ({len(generators)}) "
                "must have one entry per row")
        greedy = [p.greedy for p in params]
        top_k = [vocab_size if p.top_k <= 0 else min(p.top_k, vocab_size) for p in params]
        floats = torch.tensor(
            [[p.temperature for p in params], [p.top_p for p in params],
             [p.min_p for p in params], [p.presence_penalty for p in params],
             [p.frequency_penalty for p in params], [p.repetition_penalty for p in params]],
            dtype=torch.float32, device=device).view(6, b)  # [6, B]: one host->device copy
        temperature, top_p, min_p, presence, frequency, repetition = floats.unbind(0)

        need_rep = any(p.repetition_penalty != 1.0 for p in params)
        need_counts = need_rep or any(
            p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)

        banned: list[list[int]] = []
        for p, out in zip(params, output_token_ids):
            if p.min_tokens > 0 and len(out) < p.min_tokens:
                ids = p.stop_ids_with_eos(eos_token_ids)
                banned.append(sorted(t for t in ids if 0 <= t < vocab_size))
            else:
                banned.append([])
        banned_index = None
        if any(banned):
            ban_rows = [i for i, ids in enumerate(banned) for _ in ids]
            ban_cols = [t for ids in banned for t in ids]
            banned_index = (torch.tensor(ban_rows, dtype=torch.int64, device=device),
                            torch.tensor(ban_cols, dtype=torch.int64, device=device))

        num_logprobs = [p.logprobs for p in params]
        return cls(
            temperature=temperature, top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=top_p, min_p=min_p, presence_penalty=presence, frequency_penalty=frequency,
            repetition_penalty=repetition,
            all_greedy=all(greedy), all_random=not any(greedy), no_penalties=not need_counts,
            no_top_k=all(g or k >= vocab_size for g, k in zip(greedy, top_k)),
            no_top_p=all(g or p.top_p >= 1.0 for g, p in zip(greedy, params)),
            no_min_p=all(g or p.min_p <= 0.0 for g, p in zip(greedy, params)),
            generators={i: g for i, g in enumerate(generators) if g is not None},
            prompt_token_ids=_pad(prompt_token_ids, vocab_size, device) if need_rep else None,
            output_token_ids=_pad(output_token_ids, vocab_size, device) if need_counts else None,
            banned_token_ids=banned, num_logprobs=num_logprobs, vocab_size=vocab_size,
            greedy_mask=torch.tensor(greedy, dtype=torch.bool, device=device),
            banned_index=banned_index,
            logprob_rows=[i for i, k in enumerate(num_logprobs) if k is not None])


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int  # rank of token_id among all tokens (1 = most likely; ties share the better rank)
    top_token_ids: list[int]  # k entries, descending logprob
    top_logprobs: list[float]


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprobs | None]  # per row, None when not requested


def _token_logprobs(logprobs: Tensor, token_ids: Tensor, ks: list[int]) -> list[TokenLogprobs]:
    """logprobs [N, V] (log_softmax), token_ids [N] -> one TokenLogprobs per row, top ks[i]."""
    chosen = logprobs.gather(1, token_ids.view(-1, 1))  # [N, 1]
    ranks = (logprobs > chosen).sum(dim=-1).add_(1).tolist()  # [N]
    k_max = min(max(ks, default=0), logprobs.shape[-1])
    if k_max > 0:
        top = logprobs.topk(k_max, dim=-1)  # values/indices [N, k_max], sorted descending
        top_vals, top_ids = top.values.tolist(), top.indices.tolist()
    else:
        top_vals = top_ids = [[] for _ in ks]
    return [TokenLogprobs(token_id=t, logprob=lp, rank=r, top_token_ids=ids[:k],
                          top_logprobs=vals[:k])
            for t, lp, r, ids, vals, k in zip(token_ids.tolist(), chosen.view(-1).tolist(), ranks,
                                              top_ids, top_vals, ks)]


def compute_prompt_logprobs(logits: Tensor, target_token_ids: Tensor,
                            k: int) -> list[TokenLogprobs]:
    """Logprobs of each next prompt token: logits [T, V] at prompt positions, targets [T]."""
    if logits.dim() != 2 or target_token_ids.shape != (logits.shape[0],):
        raise ValueError(f"compute_prompt_logprobs needs logits [T, V] and targets [T], got "
                         f"{tuple(logits.shape)} and {tuple(target_token_ids.shape)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    num_tokens, vocab = logits.shape
    chunk = max(1, _PROMPT_LOGPROBS_CHUNK_ELEMS // max(vocab, 1))
    targets = target_token_ids.to(device=logits.device, dtype=torch.int64)
    out: list[TokenLogprobs] = []
    for start in range(0, num_tokens, chunk):
        lp = torch.log_softmax(logits[start:start + chunk].float(), dim=-1)  # [chunk, V]
        part = targets[start:start + chunk]  # [chunk]
        out.extend(_token_logprobs(lp, part, [k] * part.shape[0]))
    return out


class Sampler(torch.nn.Module):
    """Stateless; all per-request state (generators, token history) arrives in SamplingMetadata."""

    def forward(self, logits: Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits [B, V] in any float dtype; all arithmetic is float32."""
        batch, vocab = logits.shape
        if batch == 0:
            return SamplerOutput(token_ids=[], logprobs=[])
        if vocab != meta.vocab_size:
            raise ValueError(f"logits have {vocab} columns but SamplingMetadata was built for "
                             f"vocab_size {meta.vocab_size}; trim padded vocab before sampling")

        raw_logprobs = None  # [L, V], from the model's logits before anything below touches them
        if meta.logprob_rows:
            rows = logits if len(meta.logprob_rows) == batch else logits[meta.logprob_rows]
            raw_logprobs = torch.log_softmax(rows.float(), dim=-1)

        if meta.all_greedy and meta.no_penalties and meta.banned_index is None:
            token_ids = logits.argmax(dim=-1)  # [B]; fast path: no float copy, no sort
        else:
            x = logits.float()  # [B, V]; may alias float32 input, so only out-of-place ops below
            if meta.banned_index is not None:
                x = x.index_put(meta.banned_index, torch.tensor(-math.inf, device=x.device))
            if not meta.no_penalties:
                x = _apply_penalties(x, meta)
            token_ids = _sample(x, meta)

        logprobs: list[TokenLogprobs | None] = [None] * batch
        if raw_logprobs is not None:
            rows_t = torch.tensor(meta.logprob_rows, device=logits.device)
            ks = [meta.num_logprobs[i] or 0 for i in meta.logprob_rows]
            for i, tl in zip(meta.logprob_rows,
                             _token_logprobs(raw_logprobs, token_ids[rows_t], ks)):
                logprobs[i] = tl
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)


def _apply_penalties(x: Tensor, meta: SamplingMetadata) -> Tensor:
    """Repetition (prompt + output), then frequency and presence (output counts). x [B, V]."""
    batch, vocab = x.shape
    assert meta.output_token_ids is not None
    counts = torch.zeros(batch, vocab + 1, dtype=torch.float32, device=x.device)  # [B, V + 1]
    out_ids = meta.output_token_ids
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=torch.float32))
    counts = counts[:, :vocab]  # [B, V]; the last column collected the padding
    seen = counts > 0  # [B, V]
    if meta.prompt_token_ids is not None:
        in_prompt = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=x.device)
        in_prompt.scatter_(1, meta.prompt_token_ids, True)
        rep = meta.repetition_penalty.unsqueeze(1)  # [B, 1]
        penalty = torch.where(seen | in_prompt[:, :vocab], rep, torch.ones_like(rep))  # [B, V]
        x = torch.where(x > 0, x / penalty, x * penalty)
    x = x - meta.frequency_penalty.unsqueeze(1) * counts
    x = x - meta.presence_penalty.unsqueeze(1) * seen.to(x.dtype)
    return x


def _sample(x: Tensor, meta: SamplingMetadata) -> Tensor:
    """x [B, V] penalised float32 logits -> token ids [B]."""
    if meta.all_greedy:
        return x.argmax(dim=-1)  # ties: lowest index
    if meta.all_random:
        rows: Tensor | None = None
        row_ids = range(x.shape[0])
        xr = x / meta.temperature.unsqueeze(1)  # [B, V]
        top_k, top_p, min_p = meta.top_k, meta.top_p, meta.min_p
    else:
        rows = (~meta.greedy_mask).nonzero().view(-1)  # [R]
        row_ids = rows.tolist()
        xr = x[rows] / meta.temperature[rows].unsqueeze(1)  # [R, V]
        top_k, top_p, min_p = meta.top_k[rows], meta.top_p[rows], meta.min_p[rows]

    xr = _apply_top_k_top_p(xr, None if meta.no_top_k else top_k,
                            None if meta.no_top_p else top_p)
    if not meta.no_min_p:
        # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p)  (min_p = 0 -> threshold -inf)
        threshold = xr.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)  # [R, 1]
        xr = xr.masked_fill(xr < threshold, -math.inf)
    probs = xr.softmax(dim=-1)  # [R, V]
    sampled = _exponential_race(probs, row_ids, meta.generators)  # [R]
    if rows is None:
        return sampled
    token_ids = x.argmax(dim=-1)  # [B]; greedy rows keep their argmax
    token_ids[rows] = sampled
    return token_ids


def _apply_top_k_top_p(x: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Mask x [R, V] to each row's top-k (ties at the k-th value kept), then its nucleus top-p.

    Top-k never sorts the vocab: the k-th value comes from topk. Top-p sorts only the survivors
    of top-k (the widest row's count), so top_k=40, top_p=0.95 sorts 40 values, not V.
    """
    if top_k is None and top_p is None:
        return x
    vocab = x.shape[-1]
    width = vocab
    if top_k is not None:
        enabled = top_k < vocab  # [R]; disabled rows carry top_k = vocab
        k_max = int(top_k.masked_fill(~enabled, 1).max())
        kth = x.topk(k_max, dim=-1).values.gather(1, (top_k.clamp(max=k_max) - 1).unsqueeze(1))
        kth = kth.masked_fill(~enabled.unsqueeze(1), -math.inf)  # [R, 1]
        x = x.masked_fill(x < kth, -math.inf)
        if top_p is None:
            return x
        width = int((x > -math.inf).sum(dim=-1).max())  # survivors of the widest row
    assert top_p is not None
    if width < vocab:
        sorted_x, sorted_idx = x.topk(width, dim=-1)  # [R, W], descending
    else:
        sorted_x, sorted_idx = x.sort(dim=-1, descending=True)  # [R, V]
    probs = sorted_x.softmax(dim=-1)  # [R, W]
    mass_before = probs.cumsum(dim=-1) - probs  # [R, W]: probability strictly ahead of each token
    # keep the smallest prefix whose mass reaches top_p; rows with top_p = 1 keep everything
    remove = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    remove[:, 0] = False
    sorted_x = sorted_x.masked_fill(remove, -math.inf)
    out = torch.full_like(x, -math.inf) if width < vocab else torch.empty_like(x)
    return out.scatter_(1, sorted_idx, sorted_x)  # back to vocab order  # [R, V]


def _exponential_race(probs: Tensor, row_ids: range | list[int],
                      generators: dict[int, torch.Generator]) -> Tensor:
    """Sample one token per row of probs [R, V]: argmax(p / q), q ~ Exp(1) i.i.d.

    A seeded row draws its own q from its generator, so its token depends only on its own
    probabilities and generator state, never on its position or neighbours in the batch.
    q = -log(u), u ~ U[0, 1): on CPU uniform_ is ~5x faster than exponential_; q is never 0
    (u < 1), and u = 0 gives q = inf, which only drops that token from one draw (p = 2**-24).
    """
    q = torch.empty_like(probs)  # [R, V]
    seeded = [(j, generators[r]) for j, r in enumerate(row_ids) if r in generators]
    if len(seeded) < probs.shape[0]:
        q.uniform_()  # one draw from the global RNG for all unseeded rows
    for j, g in seeded:
        q[j].uniform_(generator=g)
    q.log_().neg_()  # Exp(1)
    return probs.div_(q).argmax(dim=-1)  # [R]
