"""Chat templates sent in requests (only with `--trust-request-chat-template`): rendered in jinja2's
ImmutableSandboxedEnvironment with a time limit, an output-size limit, and size checks on the operations that can
allocate a lot in one step (`'x' * 10**9`, `'%0999999999d' % 1`, `range`, padding filters). Best effort: a
template is code, so the flag is off by default. Runs in a worker thread, never in the event loop."""
from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_BIG_WIDTH = re.compile(r"\d{7,}")  # a width or precision of a million or more in a format string


class TemplateLimitError(Exception):
    """The template went over a limit (time, output size, a too-large operation)."""


class _Generator(CodeGenerator):
    """`a ~ b` through the environment's size check (jinja's own str_join cannot be replaced per environment)."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.checked_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _LimitedEnv(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = _Generator

    def __init__(self, max_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        self.max_chars = max_chars
        self.filters["tojson"] = _tojson
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(str(fmt)[:64])
        for name in ("center", "indent", "truncate", "wordwrap", "format", "replace", "join"):
            self.filters[name] = self._checked(self.filters[name], name)

    def checked_join(self, parts) -> str:
        strs = [str(x) for x in parts]
        if sum(map(len, strs)) > self.max_chars:
            raise TemplateLimitError(f"the template built a string of over {self.max_chars} characters")
        return "".join(strs)

    def _check_growth(self, name: str, args: tuple, kw: dict) -> None:
        """Pre-checks of the filters and str methods whose output can be far larger than their input."""
        s = args[0] if args else None
        size = 0
        if name == "replace" and isinstance(s, str) and len(args) >= 3 and isinstance(args[1], str) \
                and isinstance(args[2], str):
            size = len(s) + (s.count(args[1]) if args[1] else len(s) + 1) * len(args[2])
        elif name in ("indent", "expandtabs") and isinstance(s, str):
            width = args[1] if len(args) > 1 else kw.get("width", kw.get("tabsize", 8))
            w = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
            size = len(s) + (s.count("\n" if name == "indent" else "\t") + 1) * w
        elif name == "join" and args:
            if isinstance(s, str) and len(args) > 1:  # str method: sep.join(items)
                sep, items = s, args[1]
            else:  # filter: items|join(sep)
                items, sep = s, (args[1] if len(args) > 1 else kw.get("d", ""))
            if isinstance(items, (list, tuple)) and isinstance(sep, str):
                size = len(sep) * max(len(items) - 1, 0) + sum(len(x) for x in items if isinstance(x, str))
        if size > self.max_chars:
            raise TemplateLimitError(f"the template built a string of over {self.max_chars} characters")

    def _size(self, n: Any) -> None:
        if isinstance(n, int) and not isinstance(n, bool) and abs(n) > self.max_chars:
            raise TemplateLimitError(f"the template asked for a value of size {n}, over the limit of "
                                     f"{self.max_chars}")

    def _checked(self, f, name: str):
        def wrapped(*args, **kw):
            plain = args[1:] if getattr(f, "jinja_pass_arg", None) is not None else args
            for a in (*plain, *kw.values()):
                self._size(a)
                if name == "format" and isinstance(a, str) and _BIG_WIDTH.search(a):
                    raise TemplateLimitError("the template used a format width over the limit")
            self._check_growth(name, plain, kw)
            return f(*args, **kw)
        for attr in ("jinja_pass_arg",):
            if hasattr(f, attr):
                setattr(wrapped, attr, getattr(f, attr))
        return wrapped

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    if len(seq) * max(n, 0) > self.max_chars:
                        raise TemplateLimitError(f"the template repeats a value to over {self.max_chars} items")
        elif operator == "**":
            if isinstance(right, (int, float)) and abs(right) > 64 or \
                    isinstance(left, int) and abs(left).bit_length() > 4096:
                raise TemplateLimitError("the template raises to a power over the limit")
        elif operator == "%":
            if isinstance(left, str) and _BIG_WIDTH.search(left):
                raise TemplateLimitError("the template used a format width over the limit")
        elif operator == "+":
            if isinstance(left, (str, list)) and isinstance(right, type(left)) and \
                    len(left) + len(right) > self.max_chars:
                raise TemplateLimitError(f"the template built a value of over {self.max_chars} items")
        return super().call_binop(context, operator, left, right)

    def format_string(self, s, args, kwargs, format_func=None):
        if _BIG_WIDTH.search(str(s)):
            raise TemplateLimitError("the template used a format width over the limit")
        return super().format_string(s, args, kwargs, format_func)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        for a in (*args, *kwargs.values()):
            __self._size(a)
        if isinstance(getattr(__obj, "__self__", None), str):
            __self._check_growth(getattr(__obj, "__name__", ""), (__obj.__self__, *args), kwargs)
        return super().call(__context, __obj, *args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile(source: str, max_chars: int) -> jinja2.Template:
    return _LimitedEnv(max_chars).from_string(source)


def render_request_template(source: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
                            continue_final_message: bool, variables: dict[str, Any], time_limit_s: float,
                            max_chars: int) -> str:
    """Render `source` like transformers' apply_chat_template(tokenize=False) would, within the limits; raises
    TemplateLimitError or a jinja2 error."""
    template = _compile(source, max_chars)
    msgs = [dict(m) for m in messages]
    final = ""
    if continue_final_message:
        final = str(msgs[-1].get("content") or "")
        msgs[-1]["content"] = final + _CONTINUE_TAG
    deadline = time.monotonic() + time_limit_s

    def tracer(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateLimitError(f"the chat template took longer than {time_limit_s:g} s to render")
        return tracer

    pieces: list[str] = []
    size = 0
    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        for piece in template.generate(**variables, messages=msgs, add_generation_prompt=add_generation_prompt):
            size += len(piece)
            if size > max_chars:
                raise TemplateLimitError(f"the chat template rendered over {max_chars} characters")
            if time.monotonic() > deadline:
                raise TemplateLimitError(f"the chat template took longer than {time_limit_s:g} s to render")
            pieces.append(piece)
    finally:
        sys.settrace(old)
    text = "".join(pieces)
    if continue_final_message:
        loc = text.rfind(_CONTINUE_TAG.strip())
        if loc < 0:
            raise TemplateLimitError("continue_final_message is set but the chat template dropped the final message")
        text = text[:loc] if text[loc:loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:loc].rstrip()
    return text
