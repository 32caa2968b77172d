"""The OpenAPI schema at /openapi.json (and the /docs page on it): the handlers read their bodies themselves (to limit
their size and parse them strictly), so FastAPI cannot see the request models; they are added here, with the
OpenAI-style error body, the error statuses each endpoint can answer, and the bearer-key security scheme."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from shardserve.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                    TokenizeRequest)

REQUEST_BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
                  "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}
OPEN_PATHS = {"/health", "/metrics"}

_ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "code": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}}}
_ERRORS = {"400": "invalid request (the message and `param` name the field)", "401": "missing or wrong API key",
           "404": "unknown model", "413": "request body over --max-request-body-bytes",
           "429": "--max-waiting-requests reached", "503": "no engine replica serving"}


def _error_responses(codes: list[str]) -> dict[str, Any]:
    ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    return {c: {"description": _ERRORS[c], **ref} for c in codes}


def build_schema(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["ErrorResponse"] = _ERROR_SCHEMA
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                "description": "the server's --api-key (when it has one)"}}
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            if path not in OPEN_PATHS:
                op["security"] = [{"bearer": []}]
                op.setdefault("responses", {}).update(_error_responses(["401"]))
            model = REQUEST_BODIES.get(path) if method == "post" else None
            if model is None:
                continue
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(js.pop("$defs", {}))
            schemas[model.__name__] = js
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            codes = ["400", "404", "413"] + (["429", "503"] if path.startswith("/v1/") else [])
            op["responses"].update(_error_responses(codes))
    return schema


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app)
        return app.openapi_schema
    app.openapi = openapi  # type: ignore[method-assign]
