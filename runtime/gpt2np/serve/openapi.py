"""The served `/openapi.json`: FastAPI's description of the routes, made true to what the server
does. FastAPI documents a 422 that this server never sends and none of the statuses it does send;
and some bounds are known only when the server runs (its model's name, vocabulary and context, its
limits). Everything here is stated once, from the same constants the server enforces, and a
schemathesis run in the tests holds the two together.

What no JSON Schema can state, so that a request the schema allows may still get 400, each with
its own `code` (`CROSS_FIELD`): a prompt's tokens plus `max_tokens` beyond the context, more
completions than the server takes at once (prompts times `n`), `best_of` other than `n`,
`stream_options` without `stream`, more than one constraint.
"""

from __future__ import annotations

import warnings
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from . import protocol as P

CROSS_FIELD = {
    "context_length_exceeded": "the prompt's tokens plus max_tokens exceed the model's context",
    "too_many_completions": "the prompts times n exceed the completions the server takes at once",
    "unsupported_best_of": "best_of is not n",
    "stream_options_without_stream": "stream_options without stream: true",
    "multiple_constraints": "more than one of response_format (json_object, json_schema), structured_outputs, "
                            "json_schema and grammar",
    "invalid_constraint": "a JSON schema, pattern or grammar that the constraint library cannot use (its syntax, "
                          "the keywords it implements, its limits of work)",
}
"""The 400s a request the schema allows may still get, by `code`: rules across fields, and the
constraint's own language, which no JSON Schema states."""

ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "title": "ErrorResponse",
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}

WHY = {
    400: "The request is not valid (OpenAI's `invalid_request_error`; `param` names the field)",
    401: "The API key is missing or wrong (`Authorization: Bearer KEY`)",
    404: "No such model",
    408: "The request's body did not arrive within the body timeout (the connection is closed)",
    413: "The request's body is larger than 4 MiB",
    415: "The body is not sent as JSON",
    429: "The server's batch and queue are full: retry after `Retry-After` seconds",
    500: "The generation failed",
    503: "The server is shutting down",
}

KEYED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")  # behind --api-key

ROUTE_STATUSES = {
    ("post", "/v1/completions"): {404, 429, 500},
    ("get", "/v1/models/{name}"): {404},
    ("head", "/v1/models/{name}"): {404},
    ("post", "/tokenize"): {404},
    ("post", "/detokenize"): {404},
}


def openapi(app: FastAPI, *, model_name: str, vocab_size: int, n_positions: int, max_stop: int, capacity: int,
            api_key: bool) -> dict[str, Any]:
    with warnings.catch_warnings():  # a GET route's HEAD shares its operation id: made unique below
        warnings.filterwarnings("ignore", "Duplicate Operation ID", UserWarning)
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for operations in schema["paths"].values():
        if "head" in operations and "get" in operations:
            operations["head"]["operationId"] = operations["get"]["operationId"].removesuffix("_get") + "_head"
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {})["ErrorResponse"] = ERROR_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        components["schemas"].pop(name, None)
    if api_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            statuses = {503} | ROUTE_STATUSES.get((method, path), set())
            if method == "post":
                statuses |= {400, 408, 413, 415}
            keyed = api_key and path.startswith(KEYED)
            if keyed:
                statuses.add(401)
                op["security"] = [{"bearer": []}]
            responses = op["responses"]
            responses.pop("422", None)
            for status in sorted(statuses):
                responses[str(status)] = {"description": WHY[status], "content": {"application/json": {"schema": ERROR}}}
    paths = schema["paths"]
    completion = paths["/v1/completions"]["post"]["responses"]
    completion["400"]["description"] += ". Rules across fields, which this schema cannot state, are 400s too, " \
        "each with its code: " + "; ".join(f"`{code}`: {why}" for code, why in CROSS_FIELD.items())
    ok = completion["200"]
    ok["content"]["text/event-stream"] = {"schema": {  # with "stream": true; the schema of one event
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "description": "A completion chunk as JSON, or `[DONE]` last"}}}}
    ok["description"] = "The completion (with `stream`: server-sent events, each `data: {chunk}`, then `data: [DONE]`)"
    for method in ("get", "head"):
        paths["/metrics"][method]["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
        paths["/health"][method]["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}

    schemas = components["schemas"]
    token_id = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
    request = schemas["CompletionRequest"]["properties"]
    request["model"] = {"type": "string", "enum": [model_name], "title": "Model"}
    request["prompt"] = {"title": "Prompt", "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "items": token_id, "minItems": 1},
        {"type": "array", "items": {"type": "array", "items": token_id, "minItems": 1}, "minItems": 1}]}
    _nullable(request, "max_tokens")["maximum"] = n_positions
    request["n"]["maximum"] = min(P.MAX_N, capacity)
    stop = {"type": "string", "minLength": 1, "maxLength": P.MAX_STOP_CHARS}
    request["stop"] = {"title": "Stop", "default": None, "anyOf": [
        *([stop] if max_stop else []), {"type": "array", "items": stop, "maxItems": max_stop}, {"type": "null"}]}
    request["logit_bias"] = {"title": "Logit Bias", "default": None, "anyOf": [
        {"type": "object", "maxProperties": P.MAX_LOGIT_BIAS,
         "propertyNames": {"pattern": f"^0*({_up_to(vocab_size - 1)})$"},
         "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
        {"type": "null"}]}
    request["suffix"] = {"title": "Suffix", "default": None, "description": "GPT-2 has no fill-in-the-middle: only empty",
                         "anyOf": [{"type": "string", "maxLength": 0}, {"type": "null"}]}
    request["best_of"]["description"] = "Only equal to n"
    for method in ("get", "head"):
        for param in paths["/v1/models/{name}"][method]["parameters"]:
            param["schema"] = {"type": "string", "enum": [model_name], "title": "Name"}
    tokenize = schemas["TokenizeRequest"]
    tokenize["required"] = ["prompt"]
    tokenize["properties"]["prompt"] = {"type": "string", "title": "Prompt",
                                        "description": f"At most {P.MAX_TOKENIZE} tokens' worth"}
    tokenize["properties"]["messages"] = {"type": "null", "title": "Messages",
                                          "description": "GPT-2 has no chat template: `prompt` only"}
    for body in (tokenize, schemas["DetokenizeRequest"]):
        body["properties"]["model"] = {"anyOf": [{"type": "string", "enum": [model_name]}, {"type": "null"}],
                                       "default": None, "title": "Model"}
    schemas["DetokenizeRequest"]["properties"]["tokens"] = {"type": "array", "items": token_id, "title": "Tokens"}
    return schema


def _nullable(properties: dict, name: str) -> dict:
    """The non-null branch of an optional property's schema."""
    return next(s for s in properties[name]["anyOf"] if s.get("type") != "null")


def _up_to(n: int) -> str:
    """A regular expression for the decimal numbers 0..n (no leading zeros)."""
    digits = str(n)
    alternatives = []
    if len(digits) > 1:  # every number with fewer digits
        alternatives.append(r"[0-9]" if len(digits) == 2 else rf"[1-9][0-9]{{0,{len(digits) - 2}}}|[0-9]")
    for i, d in enumerate(digits):  # same length: equal up to i, then smaller at i, then anything
        lowest = "1" if i == 0 and len(digits) > 1 else "0"
        if int(d) > int(lowest):
            rest = len(digits) - i - 1
            alternatives.append(f"{digits[:i]}[{lowest}-{int(d) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    alternatives.append(digits)
    return "|".join(alternatives)
