"""Serving /v1/completions: a request becomes engine sequences; their events become a response.

One sequence per choice: `len(prompts) * n` of them, choice `i * n + j` for prompt i's j-th
sample. OpenAI's fields and defaults map onto `gpt2np.Options` in protocol.py
(`CompletionRequest.to_options`); this file holds the flow and the responses.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

from ..errors import GPT2Error
from ..options import Options
from ..sequence import SequenceState
from ..tokenizer import TokenLimitError
from . import protocol as P
from .protocol import APIError, CompletionRequest
from .worker import EngineWorker, QueueFull

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
CANCELLED = APIError(503, "the server shut down before the request was finished", type="server_error",
                     code="shutting_down")

PARAMS = {"n_tokens": "max_tokens", "stop_at_eos": "ignore_eos", "prompt_logprobs": "logprobs"}
"""The core's names (`Options` fields, "prompt") that OpenAI's request spells otherwise."""


def invalid(e: GPT2Error, param: str | None = None) -> APIError:
    """The core's error about a request as OpenAI's 400: its `param` is OpenAI's name for the field,
    and the message says that name (in place of the core's, or before the message)."""
    param = param or PARAMS.get(e.field, e.field)
    message = str(e)
    if param is not None and e.field and e.field != param and e.field in message:
        message = message.replace(e.field, param, 1)
    elif param is not None and param not in message:
        message = f"{param}: {message}"
    return APIError(400, message, param=param)


class Completions:
    def __init__(self, model, model_name: str, worker: EngineWorker, max_stop: int):
        self.model, self.model_name, self.worker, self.max_stop = model, model_name, worker, max_stop
        self.config, self.tokenizer = model.config, model.tokenizer

    # ------------------------------------------------------------------------- request -> sequences
    def prompts(self, req: CompletionRequest) -> list[list[int]]:
        """The request's prompts as token ids, by the core's rule, with `<|endoftext|>` in text the
        special token (as in OpenAI's and vLLM's servers). A text that cannot fit the context is
        refused as soon as that is known, without encoding all of it."""
        p = req.prompt
        ctx = self.config.n_positions
        try:
            return [self.token_ids(item, "prompt", limit=ctx)
                    for item in ([p] if isinstance(p, str) or isinstance(p[0], int) else p)]
        except TokenLimitError as e:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your prompt needs "
                                f"at least {e.at_least} tokens. Please reduce your prompt.", param="prompt",
                           code="context_length_exceeded") from None

    def token_ids(self, prompt: str | list[int], param: str, limit: int | None = None) -> list[int]:
        """Text or token ids from a request as checked ids (400 naming `param` if not)."""
        try:
            return self.model.prompt_ids(prompt, special=True, limit=limit)
        except TokenLimitError:
            raise
        except GPT2Error as e:
            raise invalid(e, param) from None

    def check_model(self, name: str | None) -> None:
        """404 unless `name` is this server's model (None: the request did not say)."""
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist: this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def options(self, req: CompletionRequest, prompt_len: int, sample: int) -> Options:
        """Sample `sample`'s options for a prompt of `prompt_len` tokens (the request's own mapping,
        `to_options`), refused with OpenAI's 400 where the context or the server's limits say so."""
        ctx = self.config.n_positions
        max_tokens = req.max_tokens_for(prompt_len, ctx)
        if prompt_len + max_tokens > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in your prompt; {max_tokens} for "
                                "the completion). Please reduce your prompt or completion length.",
                           param="max_tokens" if prompt_len <= ctx else "prompt", code="context_length_exceeded")
        if len(req.stop_strings) > self.max_stop:
            raise APIError(400, f"stop: at most {self.max_stop} stop strings are allowed, got {len(req.stop_strings)} "
                                "(gpt-serve --max-stop-strings raises the limit)", param="stop")
        try:
            return req.to_options(prompt_len, sample, ctx)
        except GPT2Error as e:
            raise self.invalid(req, e) from None

    def check(self, req: CompletionRequest) -> None:
        self.check_model(req.model)
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported (only best_of equal to n)", param="best_of",
                           code="unsupported_best_of")
        if req.suffix:
            raise APIError(400, "suffix is not supported: GPT-2 has no fill-in-the-middle", param="suffix")
        if len(req.constraint_fields) > 1:
            raise APIError(400, f"give at most one constraint, not {' and '.join(req.constraint_fields)}",
                           param=req.constraint_fields[1], code="multiple_constraints")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options",
                           code="stream_options_without_stream")

    @staticmethod
    def invalid(req: CompletionRequest, e: GPT2Error) -> APIError:
        """`invalid`, naming the request's own field for its constraint."""
        fields = req.constraint_fields
        error = invalid(e, fields[0] if e.field == "constraint" and fields else None)
        if e.field == "constraint":
            error.code = "invalid_constraint"
        return error

    def sequences(self, req: CompletionRequest) -> tuple[list[list[int]], list[SequenceState]]:
        """The request's sequences, checked (APIError if it cannot run). CPU work: tokenizing up
        to MAX_BODY_BYTES of text; handlers run it in a worker thread, off the event loop."""
        self.check(req)
        p = req.prompt
        count = (1 if isinstance(p, str) or isinstance(p[0], int) else len(p)) * req.n
        if count > self.worker.capacity:  # before any work: a small body can ask for many
            raise APIError(400, f"the request asks for {count} completions; this server takes at most "
                                f"{self.worker.capacity} at once", param="n", code="too_many_completions")
        prompts = self.prompts(req)
        seqs = []
        for i, ids in enumerate(prompts):
            for j in range(req.n):
                opts = self.options(req, len(ids), j)
                try:  # with a constraint, compiled here (a worker thread, not the engine's loop)
                    seq = self.worker.engine.sequence(ids, opts, salt=req.cache_salt)
                except GPT2Error as e:
                    raise self.invalid(req, e) from None
                seq.tag = i * req.n + j
                seqs.append(seq)
        if req.constraint_fields:
            self.worker.metrics.constrained_requests.inc()
        return prompts, seqs

    def submit(self, seqs: list[SequenceState]) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        try:
            self.worker.submit(seqs, asyncio.get_running_loop(), queue)
        except QueueFull:
            raise APIError(429, "the server is busy: its batch and queue are full; retry shortly",
                           type="rate_limit_exceeded", code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        return queue

    # ------------------------------------------------------------------------- events -> response
    async def complete(self, req: CompletionRequest, prompts: list[list[int]], seqs: list[SequenceState],
                       is_disconnected) -> dict:
        """The whole response at once; cancels the sequences if the client goes away."""
        queue = self.submit(seqs)
        left, loop = len(seqs), asyncio.get_running_loop()
        check_at = loop.time() + DISCONNECT_POLL_S
        try:
            while left:
                try:
                    events = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                    left -= sum(1 for *_, reason in events if reason is not None)
                except asyncio.TimeoutError:
                    pass
                if loop.time() >= check_at:  # events may come every step: check by the clock
                    if await is_disconnected():
                        return {}
                    check_at = loop.time() + DISCONNECT_POLL_S
        finally:
            for s in seqs:
                s.cancel()  # no-op for finished ones; frees the rest if we leave early
        self.raise_failure(req, seqs)
        rid, created = P.completion_id(), P.now()
        choices = []
        pieces = self.prompt_pieces(req, prompts)
        for seq in seqs:
            text, lp = "", None
            if req.echo:
                text = "".join(pieces[seq.tag // req.n])
            text += seq.result.text
            if req.logprobs is not None:
                lp = LogprobsBuilder(self.tokenizer, seq, req, pieces[seq.tag // req.n]).all()
            choices.append(P.choice(seq.tag, text, lp, P.FINISH_REASONS.get(seq.result.stop_reason)))
        return P.completion(rid, created, self.model_name, choices, self.usage(prompts, seqs))

    def prompt_pieces(self, req: CompletionRequest, prompts: list[list[int]]) -> list[list[str]]:
        """Each prompt's tokens as text, decoded once, when echo or logprobs need them (the echo,
        and the characters that the logprobs' offsets count)."""
        if not req.echo and req.logprobs is None:
            return [[] for _ in prompts]
        return [self.tokenizer.decode_pieces(ids) for ids in prompts]

    @staticmethod
    def usage(prompts: list[list[int]], seqs: list[SequenceState]) -> dict:
        """Each prompt counts once (and its cached tokens as its first choice found them)."""
        n = len(seqs) // len(prompts)
        return P.usage(sum(map(len, prompts)), sum(len(s.result.ids) for s in seqs),
                       sum(s.result.cached_tokens for s in seqs[::n]))

    @staticmethod
    def raise_failure(req: CompletionRequest, seqs: list[SequenceState]) -> None:
        failed = next((s for s in seqs if s.result.error is not None), None)
        if failed is not None and failed.guide is not None and failed.guide.error:
            # A constraint that reached a limit of llguidance's work as it ran: the request's fault.
            raise APIError(400, f"the generation failed: {failed.result.error}", param=req.constraint_fields[0],
                           code="invalid_constraint")
        if failed is not None:
            raise APIError(500, f"the generation failed: {failed.result.error}", type="server_error")
        if any(s.result.stop_reason == "cancelled" for s in seqs):
            raise CANCELLED

    @staticmethod
    def failure_event(req: CompletionRequest, seq: SequenceState, reason: str) -> str | None:
        """The SSE error event for a sequence that ended without a result, if it did."""
        if reason == "error" and seq.guide is not None and seq.guide.error:
            body = P.error_body(f"the generation failed: {seq.result.error}", param=req.constraint_fields[0],
                                code="invalid_constraint")
        elif reason == "error":
            body = P.error_body(f"the generation failed: {seq.result.error}", "server_error")
        elif reason == "cancelled":
            body = CANCELLED.body()
        else:
            return None
        return f"data: {json.dumps(body)}\n\n"

    async def stream(self, req: CompletionRequest, queue: asyncio.Queue, prompts: list[list[int]],
                     seqs: list[SequenceState], on_close) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text (per token with logprobs), then usage if
        asked, then [DONE]. A client that goes away cancels its sequences (the `finally`)."""
        rid, created = P.completion_id(), P.now()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choice: dict) -> str:
            body = P.completion(rid, created, self.model_name, [choice], None)
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        # Only echo and logprobs need the prompt's text and the token entries.
        pieces = self.prompt_pieces(req, prompts)
        builders = {s.tag: LogprobsBuilder(self.tokenizer, s, req, pieces[s.tag // req.n]) for s in seqs} \
            if req.echo or req.logprobs is not None else {}
        started: set[int] = set()
        left = len(seqs)
        try:
            while left:
                events = await queue.get()
                out = []
                for seq, token, text, token_text, reason in events:
                    left -= reason is not None
                    failure = self.failure_event(req, seq, reason)
                    if failure:  # cancelled by the server's shutdown, or failed
                        out.append(failure)
                        continue
                    b = builders.get(seq.tag)
                    if seq.tag not in started:  # the prompt is read: echo it first
                        started.add(seq.tag)
                        if req.echo:
                            out.append(chunk(P.choice(seq.tag, b.prompt_text, b.prompt(), None)))
                    finish = P.FINISH_REASONS.get(reason)
                    lp = b.token(token, token_text) if token is not None and req.logprobs is not None else None
                    if text or lp or finish:
                        out.append(chunk(P.choice(seq.tag, text, lp, finish)))
                if out:
                    yield "".join(out)
            if include_usage:
                body = P.completion(rid, created, self.model_name, [], self.usage(prompts, seqs))
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for s in seqs:
                s.cancel()
            on_close()


def token_name(tokenizer, token: int) -> str:
    """A token as `logprobs` name it: its text, or `bytes:\\xNN...` when it is not UTF-8 by itself."""
    raw = tokenizer.decode_bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class LogprobsBuilder:
    """OpenAI's `logprobs` object for one choice: `tokens` (each token's text; `bytes:\\xNN...`
    when a token is not valid UTF-8 by itself), `token_logprobs`, `top_logprobs` (the `logprobs`
    most likely tokens and the chosen one) and `text_offset` (each token's first character in the
    prompt followed by the completion). Each token's text comes decoded: the prompt's from
    `prompt_pieces`, the completion's from the engine (`Generation.token_texts`). With vLLM's
    `return_tokens_as_token_ids`, each token (and each key of `top_logprobs`) is `token_id:N`."""

    def __init__(self, tokenizer, seq: SequenceState, req: CompletionRequest, prompt_pieces: list[str]):
        self.tokenizer, self.seq, self.req = tokenizer, seq, req
        self.generated = 0
        self.prompt_pieces = prompt_pieces
        self.prompt_text = "".join(prompt_pieces)
        # Without echo, the completion's offsets still count the prompt's characters, as OpenAI's do.
        self.offset = 0 if req.echo else len(self.prompt_text)

    def name(self, token: int) -> str:
        return f"token_id:{token}" if self.req.return_tokens_as_token_ids else token_name(self.tokenizer, token)

    def _entries(self, ids, texts, lps, tops) -> dict:
        tokens, offsets, top_out = [], [], []
        for t, text, lp, top in zip(ids, texts, lps, tops):
            tokens.append(self.name(t))
            offsets.append(self.offset)
            self.offset += len(text)
            if top is None:
                top_out.append(None)
            else:
                d = {self.name(i): v for i, v in top.items()}
                d.setdefault(self.name(t), lp)
                top_out.append(d)
        return P.logprobs(tokens, list(lps), top_out, offsets)

    def prompt(self) -> dict | None:
        """The echoed prompt's entries (its first token has no log-probability), or None."""
        r = self.seq.result
        if self.req.logprobs is None:
            return None
        entries = self._entries(r.prompt_ids, self.prompt_pieces, r.prompt_logprobs, r.prompt_top_logprobs)
        self.offset = len(self.prompt_text)
        return entries

    def token(self, token: int, text: str) -> dict:
        """The entries of the newest generated token, whose own text is `text`."""
        r, k = self.seq.result, self.generated
        self.generated += 1
        top = r.top_logprobs[k] if r.top_logprobs else {}
        return self._entries([token], [text], [r.logprobs[k]], [top])

    def all(self) -> dict:
        r = self.seq.result
        parts = [self.prompt()] if self.req.echo else []
        parts += [self.token(t, text) for t, text in zip(r.ids, r.token_texts)]
        merged = P.logprobs([], [], [], [])
        for part in parts:
            for key in merged:
                merged[key] += part[key]
        return merged
