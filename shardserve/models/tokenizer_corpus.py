"""The embedded English text (original prose, free to use) that the built-in tokenizer is trained on.

The passages themselves live in the package data file ``data/tokenizer_corpus.json`` (a JSON list of strings,
UTF-8); this module loads them and derives the trainer's input from them.
"""

from __future__ import annotations

import json
from importlib.resources import files

# Each passage is plain prose written for this project. Changing a single character changes the
# trained tokenizer, so the built-in model's cache directory name (tiny.CACHE_SUBDIR) must be bumped
# with any edit to the data file.
_CORPUS_RESOURCE = ("data", "tokenizer_corpus.json")


def _load_passages() -> tuple[str, ...]:
    resource = files(__package__).joinpath(*_CORPUS_RESOURCE)
    passages = json.loads(resource.read_text(encoding="utf-8"))
    if not isinstance(passages, list) or not all(isinstance(p, str) for p in passages):
        raise ValueError(f"{'/'.join(_CORPUS_RESOURCE)} must hold a JSON list of strings")
    return tuple(passages)


PASSAGES: tuple[str, ...] = _load_passages()


def corpus_text() -> str:
    """All passages joined by blank lines, exactly as they are embedded."""
    return "\n\n".join(PASSAGES)


def training_texts() -> list[str]:
    """The texts the tokenizer trainer sees: the prose, then deterministic variants of it.

    The prose alone yields a few thousand merges; the variants (capitalised and upper-case words,
    numbers written in digits) add the kinds of tokens a real vocabulary has, so that the learned
    vocabulary nearly fills the model's 8192 slots.
    """
    prose = corpus_text()
    words = prose.split()
    texts = [prose, prose.upper(), " ".join(w[:1].upper() + w[1:] for w in words)]
    texts.append(" ".join(str(n) for n in range(0, 2100)))
    texts.append(" ".join(f"{n / 100:.2f}" for n in range(0, 1000, 7)))
    return texts
