"""Serving /v1/completions: a request becomes engine sequences; their events become a response.

One sequence per choice: `len(prompts) * n` of them, choice `i * n + j` for prompt i's j-th
sample (with a `seed`, sample j uses seed + j, so the n samples differ and each is repeatable).
OpenAI's fields map onto `gpt2np.Options`, with OpenAI's defaults (temperature 1, 16 tokens).
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

from ..errors import GPT2Error
from ..generate import Options, Sequence, check_ids
from . import protocol as P
from .protocol import APIError, CompletionRequest
from .worker import EngineWorker, QueueFull

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
CANCELLED = APIError(503, "the server shut down before the request was finished", type="server_error",
                     code="shutting_down")


class Completions:
    def __init__(self, model, model_name: str, worker: EngineWorker, max_stop: int):
        self.model, self.model_name, self.worker, self.max_stop = model, model_name, worker, max_stop
        self.config, self.tokenizer = model.config, model.tokenizer

    # ------------------------------------------------------------------------- request -> sequences
    def prompts(self, req: CompletionRequest) -> list[list[int]]:
        """The request's prompts as token ids. Text may hold `<|endoftext|>`, which is the special
        token (as in OpenAI's and vLLM's servers); an empty text means unconditional generation."""
        p = req.prompt
        texts_or_ids = [p] if isinstance(p, str) or isinstance(p[0], int) else p
        out = []
        for item in texts_or_ids:
            if isinstance(item, str):
                out.append(self.model.encode(item, allowed_special=True) or [self.config.eos_token_id])
            else:
                out.append(self.token_ids(item, "prompt"))
        return out

    def token_ids(self, ids: list[int], param: str) -> list[int]:
        """Token ids from a request, checked against the vocabulary (400 naming `param` if not)."""
        try:
            check_ids(ids, self.config)
        except GPT2Error as e:
            raise APIError(400, str(e), param=param) from None
        return list(ids)

    def check_model(self, name: str | None) -> None:
        """404 unless `name` is this server's model (None: the request did not say)."""
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist: this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def options(self, req: CompletionRequest, prompt_len: int, sample: int) -> Options:
        ctx = self.config.n_positions
        max_tokens = max(ctx - prompt_len, 0) if req.max_tokens is None else req.max_tokens
        if prompt_len + max_tokens > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in your prompt; {max_tokens} for "
                                "the completion). Please reduce your prompt or completion length.",
                           param="max_tokens" if prompt_len <= ctx else "prompt", code="context_length_exceeded")
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
            token = int(key)
            if token >= self.config.vocab_size:
                raise APIError(400, f"logit_bias names token {token}, outside the vocabulary", param="logit_bias")
            bias[token] = float(value)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > self.max_stop:
            raise APIError(400, f"stop: at most {self.max_stop} stop strings are allowed, got {len(stop)} "
                                "(gpt-serve --max-stop-strings raises the limit)", param="stop")
        if any(s == "" for s in stop):
            raise APIError(400, "stop strings must not be empty", param="stop")
        try:
            return Options(
                n_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else float(req.temperature),
                top_p=None if req.top_p in (None, 1) else float(req.top_p),
                top_k=None if req.top_k is None or req.top_k <= 0 else req.top_k,
                seed=None if req.seed is None else (req.seed + sample) % 2**63,
                stop=tuple(stop), stop_at_eos=not req.ignore_eos,
                presence_penalty=float(req.presence_penalty or 0), frequency_penalty=float(req.frequency_penalty or 0),
                logit_bias=bias, logprobs=req.logprobs or 0,
                prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None)
        except GPT2Error as e:
            raise APIError(400, str(e)) from None

    def check(self, req: CompletionRequest) -> None:
        self.check_model(req.model)
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported (only best_of equal to n)", param="best_of")
        if req.suffix:
            raise APIError(400, "suffix is not supported: GPT-2 has no fill-in-the-middle", param="suffix")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")

    def sequences(self, req: CompletionRequest) -> tuple[list[list[int]], list[Sequence]]:
        """The request's sequences, checked (APIError if it cannot run). CPU work: tokenizing up
        to MAX_BODY_BYTES of text; handlers run it in a worker thread, off the event loop."""
        self.check(req)
        p = req.prompt
        count = (1 if isinstance(p, str) or isinstance(p[0], int) else len(p)) * req.n
        if count > self.worker.capacity:  # before any work: a small body can ask for many
            raise APIError(400, f"the request asks for {count} completions; this server takes at most "
                                f"{self.worker.capacity} at once", param="n")
        prompts = self.prompts(req)
        seqs = []
        for i, ids in enumerate(prompts):
            for j in range(req.n):
                try:
                    seq = self.worker.engine.sequence(ids, self.options(req, len(ids), j))
                except GPT2Error as e:
                    raise APIError(400, str(e), param="prompt") from None
                seq.tag = i * req.n + j
                seqs.append(seq)
        return prompts, seqs

    def submit(self, seqs: list[Sequence]) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        try:
            self.worker.submit(seqs, asyncio.get_running_loop(), queue)
        except QueueFull:
            raise APIError(429, "the server is busy: its batch and queue are full; retry shortly",
                           type="rate_limit_exceeded", code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        return queue

    # ------------------------------------------------------------------------- events -> response
    async def complete(self, req: CompletionRequest, prompts: list[list[int]], seqs: list[Sequence],
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
        self.raise_failure(seqs)
        rid, created = P.completion_id(), P.now()
        choices = []
        for seq in seqs:
            text, lp = "", None
            if req.echo:
                text = self.tokenizer.decode(seq.result.prompt_ids)
            text += seq.result.text
            if req.logprobs is not None:
                builder = LogprobsBuilder(self.tokenizer, seq, req)
                lp = builder.all()
            choices.append(P.choice(seq.tag, text, lp, P.FINISH_REASONS.get(seq.result.stop_reason)))
        return P.completion(rid, created, self.model_name, choices, self.usage(prompts, seqs))

    @staticmethod
    def usage(prompts: list[list[int]], seqs: list[Sequence]) -> dict:
        return P.usage(sum(map(len, prompts)), sum(len(s.result.ids) for s in seqs))

    @staticmethod
    def raise_failure(seqs: list[Sequence]) -> None:
        failed = next((s for s in seqs if s.result.error is not None), None)
        if failed is not None:
            raise APIError(500, f"the generation failed: {failed.result.error}", type="server_error")
        if any(s.result.stop_reason == "cancelled" for s in seqs):
            raise CANCELLED

    @staticmethod
    def failure_event(seq: Sequence, reason: str) -> str | None:
        """The SSE error event for a sequence that ended without a result, if it did."""
        if reason == "error":
            body = P.error_body(f"the generation failed: {seq.result.error}", "server_error")
        elif reason == "cancelled":
            body = CANCELLED.body()
        else:
            return None
        return f"data: {json.dumps(body)}\n\n"

    async def stream(self, req: CompletionRequest, queue: asyncio.Queue, prompts: list[list[int]],
                     seqs: list[Sequence], on_close) -> AsyncIterator[str]:
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
        builders = {s.tag: LogprobsBuilder(self.tokenizer, s, req) for s in seqs} \
            if req.echo or req.logprobs is not None else {}
        started: set[int] = set()
        left = len(seqs)
        try:
            while left:
                events = await queue.get()
                out = []
                for seq, token, text, reason in events:
                    left -= reason is not None
                    failure = self.failure_event(seq, reason)
                    if failure:  # cancelled by the server's shutdown, or failed
                        out.append(failure)
                        continue
                    b = builders.get(seq.tag)
                    if seq.tag not in started:  # the prompt is read: echo it first
                        started.add(seq.tag)
                        if req.echo:
                            out.append(chunk(P.choice(seq.tag, b.prompt_text, b.prompt(), None)))
                    finish = P.FINISH_REASONS.get(reason)
                    lp = b.token(token) if token is not None and req.logprobs is not None else None
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


class LogprobsBuilder:
    """OpenAI's `logprobs` object for one choice: `tokens` (each token's text; `bytes:\\xNN...`
    when a token is not valid UTF-8 by itself), `token_logprobs`, `top_logprobs` (the `logprobs`
    most likely tokens and the chosen one) and `text_offset` (each token's first character in the
    prompt followed by the completion)."""

    def __init__(self, tokenizer, seq: Sequence, req: CompletionRequest):
        self.tokenizer, self.seq, self.req = tokenizer, seq, req
        self.generated = 0
        self.prompt_text = tokenizer.decode(seq.result.prompt_ids)
        # The completion's text is decoded on its own (as the engine does), after the prompt's:
        # without echo, its offsets still count the prompt's characters, as OpenAI's do.
        self.decoder, self.offset = tokenizer.stream_decoder(), 0 if req.echo else len(self.prompt_text)

    def name(self, token: int) -> str:
        raw = self.tokenizer.decode_bytes([token])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def _entries(self, ids, lps, tops) -> dict:
        tokens, offsets, top_out = [], [], []
        for t, lp, top in zip(ids, lps, tops):
            tokens.append(self.name(t))
            offsets.append(self.offset)
            self.offset += len(self.decoder.feed(t))
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
        entries = self._entries(r.prompt_ids, r.prompt_logprobs, r.prompt_top_logprobs)
        self.decoder, self.offset = self.tokenizer.stream_decoder(), len(self.prompt_text)
        return entries

    def token(self, token: int) -> dict:
        """The entries of the newest generated token."""
        r, k = self.seq.result, self.generated
        self.generated += 1
        top = r.top_logprobs[k] if r.top_logprobs else {}
        return self._entries([token], [r.logprobs[k]], [top])

    def all(self) -> dict:
        parts = [self.prompt()] if self.req.echo else []
        parts += [self.token(t) for t in self.seq.result.ids]
        merged = P.logprobs([], [], [], [])
        for part in parts:
            for key in merged:
                merged[key] += part[key]
        return merged
