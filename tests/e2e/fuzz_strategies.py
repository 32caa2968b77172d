"""hypothesis strategies derived from the server's /openapi.json: request bodies that mostly follow each endpoint's
request model (so they reach the engine), with hostile values mixed in (lone surrogates, NaN, huge integers,
unknown roles, wrong types) and some arbitrary JSON. Generation lengths are kept small so that each request is
quick on the tiny model (chat requests always carry a small or invalid max_completion_tokens)."""
from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

# always sent when the model has it: a chat request without it generates up to the whole context
ALWAYS = {"max_completion_tokens"}
ROLES = ["system", "developer", "user", "assistant", "tool", "wizard", ""]
INTS = st.one_of(st.integers(-3, 8), st.sampled_from([2**31, -2**63, 2**64, 10**30]))
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", "\ud800", "a\udc00b", "é€\U0001F600", "\x00", "hi"]))
NUMBERS = st.one_of(st.floats(-3, 3), st.sampled_from([0.0, 1e300, -1e300, float("nan"), float("inf")]), INTS)
JSON_ANY = st.recursive(st.one_of(st.none(), st.booleans(), INTS, NUMBERS, TEXT),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                        max_leaves=8)


def body_strategy(schema: dict[str, Any], root: dict[str, Any], model_name: str) -> st.SearchStrategy[bytes]:
    """JSON bytes for the request model `root` (a schema or a $ref into `schema`'s components)."""
    comps = schema["components"]["schemas"]
    overrides = {
        "model": st.sampled_from([model_name, model_name, model_name, "no-such-model"]),
        "role": st.sampled_from(ROLES),
        "max_tokens": st.sampled_from([1, 2, 5, 0, -1, 10**6, None]),
        "max_completion_tokens": st.sampled_from([1, 3, 0, -2, 10**6]),
        "n": st.sampled_from([1, 1, 2, 0, -1, 1000]),
        "min_tokens": st.sampled_from([0, 1, 3, -1, 10**6]),
    }

    def resolve(s: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in s:
            s = comps[s["$ref"].rsplit("/", 1)[1]]
        return s

    def strat(s: dict[str, Any], name: str | None = None) -> st.SearchStrategy:
        if name in overrides:
            return overrides[name]
        s = resolve(s)
        if "anyOf" in s:
            return st.one_of([strat(x) for x in s["anyOf"]])
        if "const" in s:
            return st.just(s["const"])
        if "enum" in s:
            return st.sampled_from(s["enum"])
        t = s.get("type")
        if t == "string":
            return TEXT
        if t == "integer":
            return INTS
        if t == "number":
            return NUMBERS
        if t == "boolean":
            return st.booleans()
        if t == "null":
            return st.none()
        if t == "array":
            return st.lists(strat(s.get("items", {})), max_size=4)
        if t == "object" and "properties" in s:
            required = set(s.get("required", [])) | (ALWAYS & set(s["properties"]))
            props = s["properties"]
            return st.fixed_dictionaries({k: strat(v, k) for k, v in props.items() if k in required},
                                         optional={k: strat(v, k) for k, v in props.items() if k not in required})
        return JSON_ANY

    body = strat(root)
    return st.one_of(body, body, body, body, JSON_ANY).map(lambda x: json.dumps(x).encode())
