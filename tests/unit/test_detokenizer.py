"""Tests for IncrementalDetokenizer: streamed deltas equal a full decode, split characters, stop strings."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from shardserve.engine.detokenizer import MAX_PENDING_TOKENS, IncrementalDetokenizer
from shardserve.models.tiny import BOS_ID, IM_START_ID, write_tiny_tokenizer
from shardserve.models.tokenizer_corpus import PASSAGES, corpus_text

UNICODE_TEXT = "héllo wörld 日本 🙂 naïve café — “quoted” 👩‍👩‍👧 Ω≈ç√ 한국어 ١٢٣"


# ---- tokenizers -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    """The built-in byte-level BPE tokenizer, loaded the way the engine loads it."""
    return AutoTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok")))


def _train_metaspace_bpe(vocab_size: int = 600) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([corpus_text()], trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def metaspace_tok():
    """SentencePiece-style (Metaspace, leading space dropped on decode), no byte fallback: unknown chars -> <unk>."""
    return PreTrainedTokenizerFast(tokenizer_object=_train_metaspace_bpe(), unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", clean_up_tokenization_spaces=False)


def make_llama2_style_tok() -> PreTrainedTokenizerFast:
    """Llama-2 style: '▁' normalizer, byte-fallback tokens <0xNN>, decoder Replace+ByteFallback+Fuse+Strip."""
    model = json.loads(_train_metaspace_bpe().to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def llama2_style_tok():
    return make_llama2_style_tok()


# ---- helpers ----------------------------------------------------------------------------------------------

def decode(tok, ids: list[int], skip: bool = True) -> str:
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


Streamed = tuple[list[str], str, IncrementalDetokenizer]


def stream(tok, prompt: list[int], out: list[int], rng: random.Random | None = None, **kw) -> Streamed:
    """Feed `out` in chunks of 1-3 ids (one at a time without rng); return (deltas, final text, detokenizer)."""
    d = IncrementalDetokenizer(tok, prompt, **kw)
    deltas, i = [], 0
    while i < len(out):
        n = rng.randint(1, 3) if rng else 1
        deltas.append(d.add_tokens(out[i:i + n]))
        assert d.output_text == "".join(deltas)
        i += n
    deltas.append(d.flush())
    assert d.output_text == "".join(deltas) == d.text
    return deltas, d.output_text, d


def byte_splitting_ids(tok) -> list[int]:
    """Ids whose text is not valid UTF-8 on its own: lone bytes and merges that cut a character."""
    return [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]


def random_output(rng: random.Random, n_vocab: int, splitters: list[int], specials: list[int]) -> list[int]:
    ids = []
    for _ in range(rng.randint(1, 40)):
        r = rng.random()
        ids.append(rng.choice(splitters) if r < 0.35 and splitters else
                   rng.choice(specials) if r < 0.4 else rng.randrange(n_vocab))
    return ids


def text_prompt(tok, rng: random.Random) -> list[int]:
    """Token ids of a real snippet (so the prompt ends on a whole character), or no prompt at all."""
    if rng.random() < 0.25:
        return []
    passage = rng.choice(PASSAGES)
    start = rng.randrange(len(passage) - 40)
    return tok(passage[start:start + rng.randint(1, 40)]).input_ids


# ---- deltas == full decode --------------------------------------------------------------------------------

@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_match_full_decode_byte_level(tiny_tok, skip):
    rng = random.Random(1234 + skip)
    splitters = byte_splitting_ids(tiny_tok)
    assert len(splitters) > 100  # lone bytes 0x80-0xFF and partial-character merges
    for _ in range(400):
        prompt = text_prompt(tiny_tok, rng)
        out = random_output(rng, len(tiny_tok), splitters, [BOS_ID, IM_START_ID, 1, 2, 4])
        _, text, _ = stream(tiny_tok, prompt, out, rng, skip_special_tokens=skip)
        assert text == decode(tiny_tok, out, skip), (prompt, out)


def test_random_ids_with_random_prompt_ids(tiny_tok):
    """Prompts of arbitrary ids may end mid-character; whenever the prompt's text ends on a whole character
    the output is exactly what the output adds to the prompt's text."""
    rng = random.Random(7)
    splitters = byte_splitting_ids(tiny_tok)
    checked = 0
    for _ in range(300):
        prompt = random_output(rng, len(tiny_tok), splitters, [BOS_ID])
        out = random_output(rng, len(tiny_tok), splitters, [IM_START_ID])
        _, text, _ = stream(tiny_tok, prompt, out, rng)
        ctx = prompt[-5:]
        if not decode(tiny_tok, ctx).endswith("\ufffd"):
            assert text == decode(tiny_tok, ctx + out)[len(decode(tiny_tok, ctx)):]
            checked += 1
    assert checked > 100


def test_split_characters_are_held_back_not_mangled(tiny_tok):
    ids = tiny_tok(UNICODE_TEXT, add_special_tokens=False).input_ids
    assert len(ids) > len(UNICODE_TEXT.split())  # many characters span several tokens
    deltas, text, _ = stream(tiny_tok, [BOS_ID], ids)
    assert text == UNICODE_TEXT
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # at least one step emitted nothing because a character was incomplete
    assert any(d.endswith("🙂") or d == "日" for d in deltas)


def test_metaspace_random_ids_match_full_decode(metaspace_tok):
    rng = random.Random(99)
    n = len(metaspace_tok)
    for _ in range(300):
        prompt = text_prompt(metaspace_tok, rng)
        out = random_output(rng, n, [], [0, 1, 2])
        _, text, _ = stream(metaspace_tok, prompt, out, rng)
        if not prompt:
            assert text == decode(metaspace_tok, out)
        full, before = decode(metaspace_tok, prompt[-5:] + out), decode(metaspace_tok, prompt[-5:])
        assert full.startswith(before)
        assert text == full[len(before):], (prompt, out)


def test_metaspace_keeps_the_leading_space_of_a_continuation(metaspace_tok):
    ids = metaspace_tok("The cat sat on the mat").input_ids
    k = next(i for i in range(1, len(ids)) if metaspace_tok.convert_ids_to_tokens(ids[i]).startswith("▁"))
    _, text, _ = stream(metaspace_tok, ids[:k], ids[k:])
    assert text.startswith(" ")
    assert decode(metaspace_tok, ids[:k]) + text == "The cat sat on the mat"
    _, alone, _ = stream(metaspace_tok, [], ids[k:])  # no prompt: like decode(out), leading space dropped
    assert alone == decode(metaspace_tok, ids[k:]) and not alone.startswith(" ")


def test_llama2_style_byte_fallback_streams_real_text(llama2_style_tok):
    tok = llama2_style_tok
    rng = random.Random(5)
    for text in [UNICODE_TEXT, "The cat sat on the mat. " + UNICODE_TEXT + " done", PASSAGES[31]]:
        ids = tok(text).input_ids
        assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids) or text == PASSAGES[31]
        for _ in range(20):
            k = rng.randrange(len(ids))
            if decode(tok, ids[:k]).endswith("\ufffd"):
                continue  # prompt cut inside a character
            deltas, out, _ = stream(tok, ids[:k], ids[k:], rng)
            assert decode(tok, ids[:k]) + out == text
            assert all("\ufffd" not in d for d in deltas)


def test_stray_bytes_do_not_grow_the_window(tiny_tok):
    """An endless run of undecodable ids is released after MAX_PENDING_TOKENS, keeping each step O(1)."""
    lone = tiny_tok.convert_tokens_to_ids("Ģ")  # byte 0x80 alone: never valid UTF-8
    assert decode(tiny_tok, [lone]) == "\ufffd"
    d = IncrementalDetokenizer(tiny_tok, [BOS_ID])
    emitted = "".join(d.add_tokens([lone]) for _ in range(3 * MAX_PENDING_TOKENS))
    assert 0 < len(emitted) <= 3 * MAX_PENDING_TOKENS and set(emitted) == {"\ufffd"}
    assert len(d._ids) <= 2 * MAX_PENDING_TOKENS
    assert emitted + d.flush() == "\ufffd" * 3 * MAX_PENDING_TOKENS


def test_work_per_token_is_constant(tiny_tok):
    """Count decoded ids: each step decodes a short window, never the whole sequence."""
    decoded = []

    class Counting:
        def decode(self, ids, **kw):
            decoded.append(len(ids))
            return tiny_tok.decode(ids, **kw)

    rng = random.Random(3)
    out = [rng.randrange(len(tiny_tok)) for _ in range(2000)]
    _, text, _ = stream(Counting(), tiny_tok("a long prompt " * 50).input_ids, out)
    assert text == decode(tiny_tok, out)
    assert max(decoded) <= 2 * MAX_PENDING_TOKENS and sum(decoded) <= 6 * len(out)


# ---- stop strings -----------------------------------------------------------------------------------------

SENTENCE = "The cat sat on the mat. Then it slept."


def stream_text(tok, text: str, **kw) -> tuple[list[str], IncrementalDetokenizer]:
    ids = tok(text, add_special_tokens=False).input_ids
    d = IncrementalDetokenizer(tok, [BOS_ID], **kw)
    return [d.add_tokens([i]) for i in ids], d


def test_stop_string_split_across_tokens(tiny_tok):
    # "at on t" starts inside the token " sat" and ends inside " the".
    deltas, d = stream_text(tiny_tok, SENTENCE, stop=["at on t"])
    assert d.stop_reason == "at on t"
    assert d.output_text == "".join(deltas) == "The cat s"
    assert d.finished and d.flush() == "" and d.output_text == "The cat s"


def test_stop_string_include_in_output(tiny_tok):
    deltas, d = stream_text(tiny_tok, SENTENCE, stop=["at on t"], include_stop_str_in_output=True)
    assert d.output_text == "".join(deltas) == "The cat sat on t"  # cut after the stop, mid-token
    assert d.stop_reason == "at on t"


def test_stop_at_the_very_first_token(tiny_tok):
    for stop, include, expected in [("The", False, ""), ("Th", False, ""), ("The", True, "The"),
                                    ("Th", True, "Th")]:
        deltas, d = stream_text(tiny_tok, SENTENCE, stop=[stop], include_stop_str_in_output=include)
        assert deltas[0] == expected and all(x == "" for x in deltas[1:])
        assert d.output_text == expected and d.stop_reason == stop


def test_earliest_stop_wins_whatever_the_order(tiny_tok):
    for stops in (["mat", "cat"], ["cat", "mat"], ["slept", "sat", "cat"]):
        _, d = stream_text(tiny_tok, SENTENCE, stop=stops)
        assert d.stop_reason == "cat" and d.output_text == "The "
    # The stop that is completed first wins, even if another one started earlier.
    _, d = stream_text(tiny_tok, SENTENCE, stop=["cat sat", "at"])
    assert d.stop_reason == "at" and d.output_text == "The c"


def test_nothing_is_emitted_past_a_stop(tiny_tok):
    ids = tiny_tok(SENTENCE, add_special_tokens=False).input_ids
    d = IncrementalDetokenizer(tiny_tok, [BOS_ID], stop=["on"])
    deltas, stopped_at = [], None
    for i, t in enumerate(ids):
        deltas.append(d.add_tokens([t]))
        if d.stop_reason is not None and stopped_at is None:
            stopped_at = i
    assert tiny_tok.decode(ids[stopped_at]) == " on"  # detected on the very token that completes it
    assert deltas[stopped_at] == " " and all(x == "" for x in deltas[stopped_at + 1:])
    assert d.stop_reason == "on" and d.output_text == "".join(deltas) == "The cat sat "
    assert d.add_tokens(tiny_tok(" more text", add_special_tokens=False).input_ids) == ""
    assert d.flush() == "" and d.output_text == "The cat sat "
    # Ids after the stop in the same batch are ignored too.
    d = IncrementalDetokenizer(tiny_tok, [BOS_ID], stop=["on"])
    assert d.add_tokens(ids) == "The cat sat " and d.flush() == ""


def test_possible_stop_prefix_is_held_then_released(tiny_tok):
    deltas, d = stream_text(tiny_tok, "The cat sat on the m", stop=["on the moon"])
    assert d.stop_reason is None
    assert d.output_text == "The cat sat " and d.held_text == "on the m"
    assert d.flush() == "on the m" and d.output_text == "The cat sat on the m"
    # A prefix that stops matching is released at once.
    deltas, d = stream_text(tiny_tok, "The cat sat on the mat", stop=["on the moon"])
    assert d.output_text == "The cat sat on the mat" and d.held_text == ""


def test_stop_string_of_multibyte_characters(tiny_tok):
    text = "héllo 日本 🙂 x"
    deltas, d = stream_text(tiny_tok, text, stop=["本 🙂"])
    assert d.stop_reason == "本 🙂" and d.output_text == "héllo 日"
    assert all("\ufffd" not in x for x in deltas)
    _, d = stream_text(tiny_tok, text, stop=["🙂"], include_stop_str_in_output=True)
    assert d.output_text == "héllo 日本 🙂"


def _reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s and s in text]
    if not hits:
        return text, None
    end, start, s = min(hits)
    return text[:end if include else start], s


def test_stop_strings_random_against_reference(tiny_tok):
    """Random texts, random stop strings (often spanning token boundaries), random batching of ids."""
    rng = random.Random(2024)
    for _ in range(300):
        passage = rng.choice(PASSAGES + (UNICODE_TEXT,))
        a = rng.randrange(len(passage) - 20)
        text = passage[a:a + rng.randint(20, 200)]
        stops = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.8:
                i = rng.randrange(len(text))
                stops.append(text[i:i + rng.randint(1, 8)])
            else:
                stops.append(rng.choice(["zzz", "\n\n", ". ", "the "]))
        include = rng.random() < 0.5
        ids = tiny_tok(text, add_special_tokens=False).input_ids
        deltas, out, d = stream(tiny_tok, [BOS_ID], ids, rng, stop=stops, include_stop_str_in_output=include)
        expected, reason = _reference_stop(text, stops, include)
        assert (out, d.stop_reason) == (expected, reason), (text, stops, include)
        assert "\ufffd" not in out
