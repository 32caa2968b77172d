"""Incremental detokenization of one output stream: token ids in, safe-to-emit text deltas out, stop strings applied."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

REPLACEMENT_CHAR = "\ufffd"  # what a decode produces for an incomplete (or invalid) UTF-8 byte sequence
# Prompt tokens decoded as context before the first output token: enough to start on a whole character
# (byte-level BPE: a character spans at most 4 tokens) and to keep SentencePiece's leading space.
PROMPT_CONTEXT_TOKENS = 5
# A character can span only a few tokens; past this many undecodable tokens the text is emitted as it is,
# which keeps every step O(1) even when a model emits an endless run of stray bytes.
MAX_PENDING_TOKENS = 32


class IncrementalDetokenizer:
    """Turns the token ids of one sequence into text deltas, as in HF TGI / vLLM (prefix and read offsets).

    Only a short window of ids is decoded per step: `prefix` (ids whose text was already emitted, decoded
    for context) and the new ids after `read_offset`; the new text is the decode of the whole window minus
    the decode of the prefix. This is right for byte-level BPE (a character split over several tokens) and
    for SentencePiece-style tokenizers (whose decode drops the leading space of the first token).

    Text semantics:
      * `output_text` (alias `text`) is exactly the concatenation of every string that `add_tokens` and
        `flush` returned so far; text once emitted is never changed.
      * Held back (not yet in `output_text`): text whose decode still ends in U+FFFD (a character whose
        remaining bytes may come with the next token), and, when stop strings are set, the longest tail
        that could still grow into a stop string (`held_text`).
      * A stop string is detected as soon as its last character is decoded. The one whose occurrence ends
        first wins (ties: the one starting first), so the result does not depend on how ids are batched.
        `output_text` is cut before it (or after it with `include_stop_str_in_output`), `stop_reason`
        is set to it, and nothing is emitted afterwards.
      * After all tokens and `flush()` (with no stop string hit), `output_text` equals
        `decode(prompt + output)[len(decode(prompt)):]` (clean-up of tokenization spaces off), which for
        byte-level BPE with a prompt that ends on a whole character is `decode(output)`. Exceptions: a
        character split between the prompt and the output counts as the prompt's; one whose bytes stay
        incomplete for MAX_PENDING_TOKENS tokens is emitted as U+FFFD; and decoders that are not local
        (tokenizers' ByteFallback replaces every byte of a run with U+FFFD when the run ends invalid) may
        differ from a whole-sequence decode on invalid byte sequences.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False,
                 spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.stop: list[str] = list(dict.fromkeys(s for s in (stop or []) if s))  # drop "" and duplicates
        self.include_stop_str_in_output = include_stop_str_in_output
        self.output_text = ""
        self.stop_reason: str | None = None
        self._held = ""  # decoded text not yet emitted because it may be the start of a stop string
        self._done = False
        # The window: ids[:read_offset] were emitted (they are decoded only as context), the rest is new.
        self._ids, self._prefix_text = self._prompt_context([int(t) for t in prompt_token_ids])
        self._read_offset = len(self._ids)

    @property
    def text(self) -> str:
        """Same as `output_text`: all text emitted so far."""
        return self.output_text

    @property
    def held_text(self) -> str:
        """Decoded text held back because it could still become the start of a stop string."""
        return self._held

    @property
    def finished(self) -> bool:
        """True after a stop string was hit or flush() was called; later calls emit nothing."""
        return self._done

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Feed newly generated ids; return the text that is now safe to emit (possibly "")."""
        deltas: list[str] = []
        for token_id in token_ids:
            if self._done:
                break
            self._ids.append(int(token_id))
            stable, provisional = self._step()
            deltas.append(self._emit(stable, provisional, final=False))
        return "".join(deltas)

    def flush(self) -> str:
        """At the end of the sequence (length or EOS): emit everything held back, unless a stop string was hit."""
        if self._done:
            return ""
        new_text = self._decode(self._ids)
        rest = new_text[len(self._prefix_text):]
        self._ids, self._read_offset, self._prefix_text = [], 0, ""
        delta = self._emit(rest, "", final=True)
        self._done = True
        return delta

    # ---- token ids -> stable text -------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False,
                                     spaces_between_special_tokens=self.spaces_between_special_tokens)

    def _prompt_context(self, prompt: list[int]) -> tuple[list[int], str]:
        """The last prompt ids, starting on a whole character (up to 3 more ids back) so that the context
        decodes the same alone as inside the full text (tokenizers' ByteFallback turns a whole run of bytes
        into U+FFFD when the run starts mid-character)."""
        start = max(len(prompt) - PROMPT_CONTEXT_TOKENS, 0)
        text = self._decode(prompt[start:]) if prompt else ""
        for _ in range(3):
            if start == 0 or not text.startswith(REPLACEMENT_CHAR):
                break
            start -= 1
            text = self._decode(prompt[start:])
        return prompt[start:], text

    def _step(self) -> tuple[str, str]:
        """Decode the window after one new id. Returns (stable text to release, provisional text).

        Provisional text is new text before a trailing run of U+FFFD: it will not change, but the window
        cannot advance past a split character, so it is only used to detect stop strings early.
        """
        new_text = self._decode(self._ids)
        n_prefix = len(self._prefix_text)
        pending = len(self._ids) - self._read_offset
        if (len(new_text) <= n_prefix or new_text.endswith(REPLACEMENT_CHAR)) and pending < MAX_PENDING_TOKENS:
            return "", new_text[n_prefix:].rstrip(REPLACEMENT_CHAR)
        # Slide: the ids just read become the prefix of the next window.
        del self._ids[:self._read_offset]
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return new_text[n_prefix:], ""

    # ---- stable text -> emitted text (stop strings) ---------------------------------------------------------

    def _emit(self, stable: str, provisional: str, final: bool) -> str:
        if not self.stop:
            self.output_text += stable
            return stable
        text = self._held + stable
        # No stop string can start in text already emitted: that text was released only when no tail of it
        # could begin a stop string. So searching the held tail plus the new text is enough.
        hit = _first_stop(text + provisional, self.stop)
        if hit is not None:
            start, stop_str = hit
            cut = start + len(stop_str) if self.include_stop_str_in_output else start
            delta = (text + provisional)[:cut]
            self._held, self.stop_reason, self._done = "", stop_str, True
        else:
            keep = 0 if final else _stop_prefix_len(text, self.stop)
            delta, self._held = text[:len(text) - keep], text[len(text) - keep:]
        self.output_text += delta
        return delta


class NullDetokenizer:
    """The detokenizer of an engine without a tokenizer (`skip_tokenizer_init`): no text, no stop strings; the
    same interface as IncrementalDetokenizer, so the engine's stepping does not change."""

    output_text = ""
    text = ""
    held_text = ""
    stop_reason: str | None = None

    def __init__(self) -> None:
        self._done = False

    @property
    def finished(self) -> bool:
        return self._done

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        return ""

    def flush(self) -> str:
        self._done = True
        return ""


def _first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """(start, stop string) of the occurrence in `text` that ends first; ties go to the one starting first."""
    best: tuple[int, int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
            best = (i + len(s), i, s)
    return None if best is None else (best[1], best[2])


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
