"""The playground: the page at `/` where a person tries the model (`gpt-serve --no-ui` leaves it out).

The page (`ui/`: plain HTML, CSS and JavaScript, nothing fetched from elsewhere, no build step)
is a client of the server's own API: it streams `/v1/completions` with `echo`, `logprobs` and
vLLM's `return_tokens_as_token_ids`, so every token it shows comes with its id, its probability
and the alternatives the model weighed. What it needs beyond the API lives under `/ui/api/`,
behind the API key like `/v1/`:

- `config`: the model, its context, and every sampling option with the server's own limits,
  taken from the request schema the server enforces (nothing copied into the page);
- `tokens`: every token's text as the API's `logprobs` name it, to show an alternative by its id;
- `explain`: gpt-explain's page for a text, made with the server's model, one at a time and
  counted against the same capacity as any request.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from ..errors import GPT2Error
from ..options import Options
from . import protocol as P
from .protocol import APIError, CompletionRequest, ExplainRequest
from .worker import QueueFull

UI = Path(__file__).parent / "ui"
ASSETS = {"playground.js": "text/javascript", "playground.css": "text/css"}

# The sampling options the page offers, as the API names them, and the core's option each maps onto
# (whose help text the page shows). `n` has no core option: it is the number of sequences.
OPTIONS = {"max_tokens": "n_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
           "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "seed": "seed",
           "stop": "stop", "n": None, "ignore_eos": "stop_at_eos"}
HELP = {"n": "How many completions to generate for the prompt.",
        "ignore_eos": "Keep generating after <|endoftext|>.",
        "top_k": "Sample only from the K most likely tokens (0 or -1: all).",
        "top_p": "Sample only from the smallest set of most likely tokens whose probability reaches P (1: all).",
        "temperature": "Sampling temperature: 0 is greedy; the API's default is 1."}


def option_limits(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The JSON-schema facts of one request field: its type, bounds and default (an Optional
    field's `anyOf` is read through)."""
    prop = schema["properties"][name]
    kinds = [p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"]
    out: dict[str, Any] = {"default": prop.get("default")}
    for k in kinds:
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "maxItems", "maxLength"):
            if key in k:
                out[key] = k[key]
        if k.get("type") == "array" and "items" in k:
            out.setdefault("maxLength", k["items"].get("maxLength"))
    out["type"] = "list" if any(k.get("type") == "array" for k in kinds) else kinds[0].get("type", "string")
    return out


def config(model_name: str, model_dir: str, n_positions: int, max_stop: int, capacity: int,
           api_key: bool, weights: str = "float32") -> dict[str, Any]:
    """What the page builds itself from: the model, and each option with the server's limits."""
    schema = CompletionRequest.model_json_schema(by_alias=True)
    helps = {f.name: f.metadata.get("help", "") for f in Options.__dataclass_fields__.values()}
    options = []
    for name, core in OPTIONS.items():
        o = {"name": name, **option_limits(name, schema), "help": HELP.get(name) or helps.get(core, "")}
        if name == "max_tokens":
            o["maximum"] = n_positions
        elif name == "n":
            o["maximum"] = min(o.get("maximum", P.MAX_N), capacity)
        elif name == "stop":
            o["maxItems"] = max_stop
        options.append(o)
    return {"model": model_name, "model_dir": model_dir, "n_positions": n_positions, "api_key": api_key,
            "weights": weights,
            "max_logprobs": P.MAX_LOGPROBS, "max_explain_positions": _explain_positions(n_positions),
            "options": options}


def _explain_positions(n_positions: int) -> int:
    from ..inside import MAX_POSITIONS
    return min(MAX_POSITIONS, n_positions)


@lru_cache(maxsize=4)
def token_names(tokenizer, vocab_size: int) -> list[str]:
    """Every token's name as the API's `logprobs` give it (text, or `bytes:\\xNN` where the token is
    not UTF-8 by itself), by id."""
    from .completions import token_name
    return [token_name(tokenizer, i) for i in range(vocab_size)]


def add_routes(app: FastAPI, state, completions) -> None:
    """The page at `/`, its files under `/ui/`, and `/ui/api/` (config, tokens, explain)."""
    model = state.model
    explaining = threading.Lock()  # one report at a time: it is a whole reference pass over the text

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(UI / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/ui/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in ASSETS:
            raise APIError(404, f"no such file: /ui/{name}", code="not_found")
        return FileResponse(UI / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    @app.get("/ui/api/config", include_in_schema=False)
    async def ui_config():
        return config(state.model_name, state.model_dir, model.config.n_positions, state.max_stop,
                      state.worker.capacity, bool(state.api_key), model.matmul.weights)

    @app.get("/ui/api/tokens", include_in_schema=False)
    async def tokens():
        names = await run_in_threadpool(token_names, model.tokenizer, model.config.vocab_size)
        return JSONResponse(names, headers={"Cache-Control": "max-age=3600"})

    @app.post("/ui/api/explain", include_in_schema=False)
    async def explain(req: ExplainRequest):
        completions.check_model(req.model)
        try:
            with state.worker.reserve():
                return HTMLResponse(await run_in_threadpool(_explain_page, model, req.prompt, explaining))
        except QueueFull:
            raise APIError(429, "the server is busy: its batch and queue are full; retry shortly",
                           type="rate_limit_exceeded", code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None


def _explain_page(model, text: str, lock: threading.Lock) -> str:
    from ..inside import page, report

    most = _explain_positions(model.config.n_positions)
    try:
        n = len(model.encode(text, limit=most))
    except GPT2Error:
        n = most + 1
    if n > most:
        raise APIError(400, f"explain shows texts of at most {most} tokens; this one has more", param="prompt",
                       code="prompt_too_long")
    with lock:
        try:
            return page.render(report(model, text, 0))
        except GPT2Error as e:
            raise APIError(400, str(e), param="prompt") from None
