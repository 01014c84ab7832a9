"""The HTTP endpoints of `gpt-serve` (FastAPI), and the one place errors get OpenAI's shape."""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import GPT2
from ..tokenizer import TokenLimitError
from . import protocol as P
from .completions import Completions
from .metrics import Metrics
from .openapi import openapi
from .protocol import APIError, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .worker import EngineWorker

log = logging.getLogger("gpt2np.serve")

MAX_BODY_BYTES = 4 * 1024 * 1024
"""The largest request body accepted (413 beyond): room for 64 prompts of 1024 token ids."""
DEFAULT_BODY_TIMEOUT = 30.0  # seconds for a whole request body to arrive (408 beyond)


@dataclass
class ServerState:
    model: GPT2
    model_name: str
    worker: EngineWorker
    metrics: Metrics
    api_key: str | None = None
    max_stop: int = P.MAX_STOP  # stop strings a request may give
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    started: int = field(default_factory=P.now)
    draining: bool = False
    in_flight: int = 0  # completion requests not yet answered in full
    model_dir: str = ""  # as given on the command line (the playground's gpt-run command names it)
    ui: bool = True  # the playground at / (`--no-ui`: none)


def error_response(e: APIError, close: bool = False) -> JSONResponse:
    """`close`: the request's body was not read, so the connection cannot carry another request."""
    headers = {**(e.headers or {}), **({"Connection": "close"} if close else {})}
    return JSONResponse(e.body(), status_code=e.status, headers=headers or None)


class Guard:
    """Pure ASGI middleware in front of everything: body size limit, draining, API key, metrics.
    (Pure ASGI, not BaseHTTPMiddleware, so that streamed responses pass through untouched.)"""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = {}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            error = self.check(headers, path)
            if error is None and scope["method"] in ("POST", "PUT", "PATCH"):
                receive, error = await self.read_body(headers, receive)
                if error is None:
                    error = self.check_content_type(headers)
                if error is None and b"content-type" not in headers:  # read as JSON, as before
                    scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
            if error is not None:
                # the body was not read (or not whole): close, as nothing after it can be parsed
                return await error_response(error, close=True)(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            if path.startswith("/v1/") or path in _TOKENIZER_PATHS:
                self.state.metrics.requests.labels(path if path in _KNOWN else "other",
                                                   str(status.get("code", 499))).inc()

    def check(self, headers: dict[bytes, bytes], path: str) -> APIError | None:
        if self.state.draining and path != "/metrics":
            return APIError(503, "the server is shutting down and takes no new requests", type="server_error",
                            code="shutting_down")
        key = self.state.api_key
        if key and (path.startswith(("/v1/", "/ui/api/")) or path in _TOKENIZER_PATHS):
            auth = headers.get(b"authorization", b"")  # bytes as sent: a UTF-8 key matches
            given = auth[7:] if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, key.encode("utf-8")):
                return APIError(401, "Incorrect API key provided: pass it as `Authorization: Bearer KEY`",
                                code="invalid_api_key")
        return None

    @staticmethod
    def check_content_type(headers: dict[bytes, bytes]) -> APIError | None:
        """415 unless the body is sent as JSON (a body without a Content-Type is read as JSON)."""
        given = headers.get(b"content-type")
        if given is None:
            return None
        kind = given.split(b";")[0].strip().lower()
        if kind == b"application/json" or kind.startswith(b"application/") and kind.endswith(b"+json"):
            return None
        return APIError(415, f"the body must be JSON, sent with `Content-Type: application/json` "
                             f"(got {given.decode('latin-1')[:100]!r})", code="unsupported_media_type")

    async def read_body(self, headers: dict[bytes, bytes], receive):
        """The whole body, refused with 413 past MAX_BODY_BYTES (by its Content-Length at once)
        and with 408 if it has not all come within the body timeout."""
        length = headers.get(b"content-length")
        too_big = APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return receive, too_big
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.state.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                return receive, APIError(408, f"the request body did not arrive within {self.state.body_timeout:g} s",
                                         code="request_timeout")
            if message["type"] == "http.disconnect":
                return receive, APIError(400, "the client went away")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY_BYTES:
                return receive, too_big
            if not message.get("more_body"):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None


_TOKENIZER_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")
"""vLLM's tokenizer endpoints: counted, and behind the API key, like /v1/."""
_KNOWN = {"/v1/completions", "/v1/models", "/v1/chat/completions", *_TOKENIZER_PATHS}


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="gpt2np", description="GPT-2 in NumPy: OpenAI's completions API", docs_url=None,
                  redoc_url=None)
    completions = Completions(state.model, state.model_name, state.worker, state.max_stop)
    state.metrics.running.set_function(lambda: state.worker.running)
    state.metrics.waiting.set_function(lambda: state.worker.waiting)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, param = P.describe_validation_error(e.errors())
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return error_response(APIError(404, f"no such path: {request.method} {request.url.path}",
                                           code="not_found"))
        if e.status_code == 405:
            return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}",
                                           code="method_not_allowed", headers=e.headers))
        return error_response(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unexpected error")
        return error_response(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))

    get = app.api_route  # GET routes answer HEAD too (the same headers, no body), as HTTP asks

    @get("/health", methods=["GET", "HEAD"])
    async def health():
        return Response(status_code=200, media_type="text/plain")

    card = P.model_card(state.model_name, state.started, state.model.config.n_positions, state.model.matmul.weights)

    @get("/v1/models", methods=["GET", "HEAD"])
    async def list_models():
        return P.models([card])

    @get("/v1/models/{name:path}", methods=["GET", "HEAD"])
    async def get_model(name: str):
        completions.check_model(name)
        return card

    @app.post("/v1/completions")
    async def create_completion(req: CompletionRequest, request: Request):
        prompts, seqs = await run_in_threadpool(completions.sequences, req)
        if req.stream:
            queue = completions.submit(seqs)
            state.in_flight += 1

            def closed():
                state.in_flight -= 1

            return StreamingResponse(completions.stream(req, queue, prompts, seqs, closed),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        state.in_flight += 1
        try:
            body = await completions.complete(req, prompts, seqs, request.is_disconnected)
        finally:
            state.in_flight -= 1
        return JSONResponse(body)

    @app.post("/v1/chat/completions", include_in_schema=False)  # exists only to say why not
    async def chat():
        raise APIError(400, "GPT-2 has no chat format, so this server has no chat endpoint: "
                            "use /v1/completions with a prompt", code="unsupported_endpoint")

    @get("/tokenizer_info", methods=["GET", "HEAD"])
    async def tokenizer_info():
        config = state.model.config
        return P.tokenizer_info(state.model.tokenizer, config.eos_token_id, config.n_positions)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        completions.check_model(req.model)
        if req.messages is not None:
            raise APIError(400, "GPT-2 has no chat template, so /tokenize takes a `prompt`, not `messages`",
                           param="messages")
        if req.prompt is None:
            raise APIError(400, "prompt is required", param="prompt")
        try:
            tokens = await run_in_threadpool(state.model.encode, req.prompt, allowed_special=True, limit=P.MAX_TOKENIZE)
        except TokenLimitError as e:
            raise APIError(400, f"/tokenize takes texts of at most {P.MAX_TOKENIZE} tokens; this one needs at least "
                                f"{e.at_least}", param="prompt", code="prompt_too_long") from None
        tok = state.model.tokenizer
        strs = [tok.id_to_token.get(t) or tok.decode([t]) for t in tokens] if req.return_token_strs else None
        return P.tokenize_response(tokens, state.model.config.n_positions, strs)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        completions.check_model(req.model)
        return {"prompt": state.model.decode(completions.token_ids(req.tokens, "tokens"))}

    @get("/metrics", methods=["GET", "HEAD"])
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if state.ui:
        from .playground import add_routes
        add_routes(app, state, completions)

    schema = openapi(app, model_name=state.model_name, vocab_size=state.model.config.vocab_size,
                     n_positions=state.model.config.n_positions, max_stop=state.max_stop,
                     capacity=state.worker.capacity, api_key=bool(state.api_key))
    app.openapi = lambda: schema
    return Guard(app, state)
