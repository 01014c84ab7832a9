"""One generation: its state while it decodes (`SequenceState`) and its outcome (`Generation`).

The loop that steps many sequences together is `gpt2np.engine.Engine`. A sequence knows how to
turn the logits of its next position into a token, text, log-probabilities and a stopping point;
the engine decides which positions of which sequences go into each forward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .config import GPT2Config
from .constraint import backend as constraint_backend
from .errors import GPT2Error
from .kv import KVCache, KVPool
from .options import MAX_TOP_LOGPROBS as TOP
from .options import Options
from .prefix_cache import PrefixSlot, PromptRecord, Stats
from .prompts import check_ids
from .sampling import choose, log_normalizers, logprob, token_logprob, top_ids, top_logprobs
from .stops import StopStrings
from .tokenizer import Tokenizer

STOP_REASONS = {
    "eos": "the model produced <|endoftext|>",
    "stop": "the text reached one of the stop strings",
    "length": "the requested number of tokens was generated",
    "context": "the model's context is full (use the sliding window to go on)",
    "cancelled": "the caller cancelled the generation",
    "error": "the generation failed: see its error",
}


@dataclass
class Generation:
    """The outcome of one prompt.

    `ids` are all generated tokens (including an `<|endoftext|>` or the token that completed a
    stop string); `text` is what was streamed: their text up to, not including, the stop string
    or `<|endoftext|>`. `logprobs[i]` is the model's log-probability of `ids[i]` (temperature 1,
    before penalties, bias or filtering); with the option `logprobs=N`, `top_logprobs[i]` maps the
    N most likely token ids at that step to theirs. With `prompt_logprobs`, `prompt_logprobs[i]` is
    the log-probability of `prompt_ids[i]` given the tokens before it (None for the first).
    `token_texts[i]` is the text `ids[i]` decoded to, in order (a UTF-8 character split across
    tokens comes with the token that completes it; the stop string's text too): each token's text
    is decoded once, here, and every front door reads it from here or from the engine's events.
    `stop_reason` is a key of `STOP_REASONS`; `error` says what went wrong when it is "error".
    Timings: `queue_s` waiting for a place in the batch, `prefill_s` from then to the first
    token, `decode_s` from the first token to the last.
    """

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    stop_reason: str = ""
    error: str | None = None
    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    token_texts: list[str] = field(default_factory=list)
    cached_tokens: int = 0  # prompt positions taken from the prefix cache, not computed
    forced: int = 0  # of `ids`, how many a constraint forced (appended without sampling: fast-forward)

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: the first token comes with the prompt pass, each later one costs a step."""
        return (len(self.ids) - 1) / self.decode_s if len(self.ids) > 1 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = {"prompt_ids": self.prompt_ids, "ids": self.ids, "text": self.text, "logprobs": self.logprobs,
             "stop_reason": self.stop_reason,
             "timings": {"prefill_s": self.prefill_s, "decode_s": self.decode_s, "tokens_per_s": self.tokens_per_s}}
        if self.top_logprobs:
            d["top_logprobs"] = [{str(k): v for k, v in t.items()} for t in self.top_logprobs]
        if self.prompt_logprobs:
            d["prompt_logprobs"] = self.prompt_logprobs
        if self.error is not None:
            d["error"] = self.error
        return d


class Event(NamedTuple):
    """What one engine step did to one sequence. A sequence's last event carries its stop
    `reason` (`Generation.stop_reason`, fixed when the event is made: a listener on another thread
    may read it after the sequence has moved on); one that ends without a token (cancelled,
    failed, or only scoring its prompt) has `token` None."""

    sequence: SequenceState
    token: int | None = None  # the token it chose
    text: str = ""  # the text that token releases (held back while it may begin a stop string)
    token_text: str = ""  # the token's own decoded text (`Generation.token_texts`)
    reason: str | None = None  # set on the sequence's last event: why it stopped


class SequenceState:
    """One prompt's state while it waits, reads its prompt and decodes.

    `pending` holds the positions still to run before the next token can be chosen: the prompt
    (or the part of it not yet read), then one token at a time. The engine runs some or all of
    them and, once none is left, hands the logits of the last one to `accept`. `cancel()` may be
    called from any thread; the engine drops the sequence at its next step.
    """

    def __init__(self, prompt_ids: list[int], options: Options, config: GPT2Config, tokenizer: Tokenizer,
                 error: str | None = None, score_from: int = 1, salt: str | None = None):
        self.result = Generation(prompt_ids=list(prompt_ids))
        self.options, self.config, self.tokenizer = options, config, tokenizer
        self.context = list(prompt_ids)  # prompt and generated tokens: what a sliding window restarts from
        self.cancelled = False
        self.done = False
        self.cache: KVCache | None = None  # allocated when the engine admits the sequence
        self.kv_pool: KVPool | None = None  # where its cache comes from and goes back to (the engine's)
        self.submitted_at = time.perf_counter()
        self.admitted_at = self.first_token_at = self.finished_at = 0.0
        self.tag: Any = None  # for the caller: which request or prompt this is
        self.fresh = True  # pending is the whole prompt, as given (not a sliding window's restart)
        self.prefix = PrefixSlot(salt)  # the prefix cache's own (`PrefixCacheManager`): salt, keys, record
        self.guide = None  # with a constraint, where the output is in it (`gpt2np.structured.Guide`)
        self.forced: list[int] = []  # pending[1:] when a constraint forced them: their rows give their logprobs
        if error is not None:
            self.fail(error)
            return
        n = config.n_positions
        if not prompt_ids:
            raise GPT2Error("a prompt is empty (start it with <|endoftext|> for unconditional text)", "prompt")
        check_ids(prompt_ids, config)
        for token, _ in options.logit_bias:
            if token >= config.vocab_size:
                raise GPT2Error(f"logit_bias names token {token}, outside the vocabulary (0..{config.vocab_size - 1})",
                                "logit_bias")
        # The bias as arrays, once: each step adds it in one operation, not one per entry.
        self.bias_ids = np.array([t for t, _ in options.logit_bias], np.int64)
        self.bias = np.array([b for _, b in options.logit_bias], np.float32)
        if len(prompt_ids) > n and not options.sliding_window:
            raise GPT2Error(f"the prompt is {len(prompt_ids)} tokens; the model's context is {n} "
                            "(the sliding window keeps only the most recent part)", "prompt")
        if options.constraint is not None:  # compiled here: on the caller's thread, not the engine's loop
            self.guide = constraint_backend().Guide(options.constraint, tokenizer, config.vocab_size)
        self.rng = options.sampling.rng()
        self.text_decoder = tokenizer.stream_decoder()
        self.stops = StopStrings(options.stop)
        self.counts: dict[int, int] = {}  # generated tokens, for the penalties
        self.scoring = options.prompt_logprobs is not None  # the prompt's own tokens are being scored
        self.score_from = max(1, score_from)  # the first prompt token scored (a scoring window's own part)
        if self.scoring:
            self.result.prompt_logprobs += [None] * min(self.score_from, len(prompt_ids))
            self.result.prompt_top_logprobs += [None] * min(self.score_from, len(prompt_ids))
        keep = self.slide_keep
        self.pending = np.asarray(self.context[-keep:] if len(prompt_ids) > n else self.context, np.int64)
        self.reading = True  # pending holds a prompt (or a window to recompute), not one new token
        if options.n_tokens == 0 and not self.scoring:
            self._finish("length", "", flush=False)

    @property
    def slide_keep(self) -> int:
        """How many recent tokens the sliding window keeps when the context is full."""
        return self.config.n_positions // 2

    def cancel(self) -> None:
        self.cancelled = True

    def event(self, token: int | None = None, text: str = "", token_text: str = "") -> Event:
        """This step's `Event` for this sequence, with its stop reason if it is done."""
        return Event(self, token, text, token_text, self.result.stop_reason if self.done else None)

    def events(self, taken: list[tuple[int | None, str, str]]) -> list[Event]:
        """The events of the tokens `accept` took in one step: the stop reason on the last only."""
        return [Event(self, *t) for t in taken[:-1]] + [self.event(*taken[-1])]

    def admit(self, prefix: list[tuple[np.ndarray, np.ndarray]] = ()) -> None:
        """Take a place in the batch: allocate the cache for the prompt and every new token. The
        prompt's first positions may be `prefix`, runs of keys and values read in place
        (`KVCache.share`): the cache's own arrays then hold only the rest."""
        self.admitted_at = time.perf_counter()
        self.result.queue_s = self.admitted_at - self.submitted_at
        self._new_cache(len(self.pending), prefix)

    def _new_cache(self, n_ids: int, prefix: list[tuple[np.ndarray, np.ndarray]] = ()) -> None:
        left = self.options.n_tokens - len(self.result.ids)
        own = min(self.config.n_positions, n_ids + left) - sum(v.shape[2] for _, v in prefix)
        self._release_cache()
        self.cache = KVCache(self.config, own) if self.kv_pool is None else self.kv_pool.take(own)
        self.cache.share(prefix)

    def _release_cache(self) -> None:
        if self.cache is not None and self.kv_pool is not None:
            self.kv_pool.give(self.cache)
        self.cache = None

    def score_rows(self, first: int, n: int) -> slice:
        """Of the n positions first, first+1, ... just read, those whose logits score a prompt token
        from `score_from` on (position j predicts prompt token j + 1)."""
        begin = min(max(0, self.score_from - 1 - first), n)
        end = max(begin, min(n, len(self.result.prompt_ids) - 1 - first))
        return slice(begin, end)

    def score_prompt(self, logits: np.ndarray, first: int) -> None:
        """Record the prompt's log-probabilities from the logits of its positions first, first+1, ...
        (position j predicts prompt token j + 1)."""
        opts, r, prompt = self.options, self.result, self.result.prompt_ids
        logits = logits[:max(0, len(prompt) - 1 - first)]  # the last prompt position predicts no prompt token
        if not len(logits):
            return
        peaks, log_sums = log_normalizers(logits)
        rec = self.prefix.record
        if rec is not None:  # kept for the prefix cache: each position's normalizer and top logits
            rows, span = np.arange(len(logits)), slice(first, first + len(logits))
            ids = top_ids(logits, TOP)
            rec.max_logit[span], rec.log_sum[span], rec.scored[span] = peaks, log_sums, True
            rec.top_ids[span], rec.top_logits[span] = ids, np.take_along_axis(logits, ids, axis=1)
            rec.next_logit[span] = logits[rows, prompt[first + 1:first + 1 + len(logits)]]
            self.score_cached(rec.rows(span), len(logits), start=first)
            return
        for j, (row, norm) in enumerate(zip(logits, zip(peaks, log_sums)), start=first):
            r.prompt_logprobs.append(token_logprob(row, prompt[j + 1], norm))
            r.prompt_top_logprobs.append(top_logprobs(row, opts.prompt_logprobs, norm) if opts.prompt_logprobs else {})

    def score_cached(self, record: Stats, n_positions: int, start: int = 0) -> None:
        """Record the prompt's log-probabilities at positions start .. start + n_positions - 1 from
        their scoring as the prefix cache keeps it (`record`: arrays over those positions, from the
        cache, or just made): the same floats `token_logprob` and `top_logprobs` give from the
        logits (the same logits, normalizer and expression)."""
        r, n = self.result, self.options.prompt_logprobs
        begin = max(0, self.score_from - 1 - start)
        lps = logprob(record.next_logit[begin:n_positions], (record.max_logit[begin:n_positions],
                                                             record.log_sum[begin:n_positions]))
        r.prompt_logprobs += lps.tolist()
        if not n:
            r.prompt_top_logprobs += [{} for _ in range(begin, n_positions)]
            return
        values = logprob(record.top_logits[begin:n_positions, :n], (record.max_logit[begin:n_positions, None],
                                                                     record.log_sum[begin:n_positions, None]))
        for ids, vals in zip(record.top_ids[begin:n_positions, :n].tolist(), values.tolist()):
            r.prompt_top_logprobs.append(dict(zip(ids, vals)))

    def take_cached(self, record: PromptRecord, reused: int) -> None:
        """The `reused` positions' scoring from the prefix cache: into the result, and kept."""
        self.score_cached(record, reused)
        own = self.prefix.record
        if own is not None:
            for name in vars(own):
                getattr(own, name)[:reused] = getattr(record, name)[:reused]

    def skip_cached(self, n: int) -> None:
        """Start after the first n positions of the prompt, which the cache gave (not computed)."""
        self.cache.length = n
        self.pending = self.pending[n:]
        self.result.cached_tokens = n

    def accept(self, logits: np.ndarray | None, norm: tuple | None = None) -> list[tuple[int | None, str, str]]:
        """Take the next tokens from the logits of the positions just run; return, for each token
        taken, the token, the text it releases (held back while it may begin a stop string) and
        its own decoded text.

        `logits` [1 + len(forced), V]: the rows of the pending positions after the first, which
        give the log-probabilities of the forced tokens among them (see `forced`), then the row of
        the last, from which the next token is chosen (or, where the constraint forces it, taken).
        `norm`: their `log_normalizers`, if the caller made them (for a batch, in one pass). A
        sequence that only scores its prompt (no new tokens) finishes here instead (its `logits`
        may be None)."""
        r, opts = self.result, self.options
        now = time.perf_counter()
        if not r.ids:
            self.first_token_at = now
            r.prefill_s = now - self.admitted_at
        self.scoring = self.reading = self.fresh = False
        if opts.n_tokens == 0:
            return [(None, self._finish("length", "", flush=False), "")]
        if norm is None:
            norm = log_normalizers(logits)
        taken, queued, self.forced = [], self.forced, []
        for i, token in enumerate(queued):  # appended last step: their rows give their log-probabilities
            taken.append(self._take(token, logits[i], (norm[0][i], norm[1][i]),
                                    complete=i == len(queued) - 1 and self.guide.finished))
            if self.done:
                return taken
            r.text += taken[-1][1]
        row, row_norm = logits[-1], (norm[0][-1], norm[1][-1])
        guide = self.guide
        if guide is None:
            token = choose(self._adjusted(row) if opts.adjusts_logits else row, opts.sampling, self.rng)
            return taken + [self._take_and_schedule(token, row, row_norm, [])]
        guide.check()
        forced = self._fast_forward(0)
        if forced:  # the constraint forces the next token: take it, and run the rest in one pass
            return taken + [self._take_and_schedule(forced[0], row, row_norm, forced[1:])]
        token = choose(self._constrained(row), opts.sampling, self.rng)
        if token == self.config.eos_token_id:  # allowed only where the output is complete
            return taken + [self._take(token, row, row_norm, complete=True)]
        guide.consume([token])
        return taken + [self._take_and_schedule(token, row, row_norm, self._fast_forward(1))]

    def _fast_forward(self, taking: int) -> list[int]:
        """The tokens the constraint forces next (none without `fast_forward`), as many as the
        tokens left and the context allow after `taking` more tokens; the guide consumes them."""
        if not self.options.fast_forward:
            return []
        left = min(self.options.n_tokens - len(self.result.ids) - taking,
                   self.config.n_positions - self.cache.length - taking)
        forced = self.guide.forced()[:max(left, 0)]
        if forced:
            self.guide.consume(forced)
            self.result.forced += len(forced)
        return forced

    def _constrained(self, row: np.ndarray) -> np.ndarray:
        """The logits to choose from under the constraint: penalties and bias first, then −inf
        for every token the constraint forbids (sampling renormalises over the rest)."""
        z = self._adjusted(row) if self.options.adjusts_logits else row
        if self.guide.allowed is None:  # not filled by the engine for the batch
            self.guide.fill()
            self.guide.check()
        return np.where(self.guide.allowed[:len(z)], z, np.float32(-np.inf))

    def _take_and_schedule(self, token: int, row: np.ndarray, norm: tuple, then: list[int]) -> tuple[int, str, str]:
        """Take `token`; unless that ends the sequence, the next pass runs it and `then` (forced
        tokens whose log-probabilities its rows will give)."""
        finished = self.guide is not None and not then and self.guide.finished
        token, text, piece = self._take(token, row, norm, complete=finished)
        if self.done:
            return token, text, piece
        if self.cache.length == self.config.n_positions:  # no room for the token just taken
            if not self.options.sliding_window:
                return token, self._finish("context", text), self.result.token_texts[-1]
            self.pending = np.asarray(self.context[-self.slide_keep:], np.int64)
            self.reading = True
            self._new_cache(len(self.pending))
        else:
            self.pending = np.array([token, *then], np.int64)
            self.forced = list(then)
        self.result.text += text
        return token, text, piece

    def _take(self, token: int, row: np.ndarray, norm: tuple, complete: bool = False) -> tuple[int, str, str]:
        """Record one new token (its log-probability from `row`, the model's own distribution),
        release its text and end the sequence where it ends: at <|endoftext|>, a stop string, the
        token limit, or (`complete`) where the constraint's output is complete."""
        r, opts = self.result, self.options
        r.ids.append(token)
        r.logprobs.append(token_logprob(row, token, norm))
        if opts.logprobs:
            r.top_logprobs.append(top_logprobs(row, opts.logprobs, norm))
        self.context.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        guided = self.guide is not None
        if token == self.config.eos_token_id and (opts.stop_at_eos or guided):
            text = self._finish("stop" if guided else "eos", "")  # a trailing partial character goes to the token before
            r.token_texts.append(self.tokenizer.decode([token]))
            return token, text, r.token_texts[-1]
        piece = self.text_decoder.feed(token)
        r.token_texts.append(piece)
        text, stopped = self.stops.feed(piece)
        if stopped:
            return token, self._finish("stop", text, flush=False), piece
        if complete:
            return token, self._finish("stop", text), r.token_texts[-1]
        if len(r.ids) == opts.n_tokens:
            return token, self._finish("length", text), r.token_texts[-1]
        return token, text, piece

    def _adjusted(self, logits: np.ndarray) -> np.ndarray:
        """The logits after OpenAI's penalties (on tokens generated so far) and the logit bias."""
        opts, z = self.options, logits.copy()
        if self.counts:
            ids = np.fromiter(self.counts, np.int64, len(self.counts))
            counts = np.fromiter(self.counts.values(), np.float32, len(self.counts))
            z[ids] -= np.float32(opts.frequency_penalty) * counts + np.float32(opts.presence_penalty)
        if self.bias.size:
            np.add.at(z, self.bias_ids, self.bias)  # in order, as one `+=` per entry would (a token may repeat)
        return z

    def _finish(self, reason: str, text: str, flush: bool = True) -> str:
        if flush:  # a trailing partial UTF-8 character, then anything held for the stop strings
            rest = self.text_decoder.flush()
            if rest and self.result.token_texts:
                self.result.token_texts[-1] += rest
            tail, stopped = self.stops.feed(rest)
            text += tail if stopped else tail + self.stops.flush()
            reason = "stop" if stopped else reason
        self.done = True
        self._release_cache()  # the memory goes back now, not when the caller lets go of the sequence
        self.finished_at = time.perf_counter()
        r = self.result
        r.stop_reason = reason
        r.text += text
        if self.first_token_at:
            r.decode_s = self.finished_at - self.first_token_at
        return text

    def fail(self, message: str) -> None:
        self.result.error = message
        self._finish("error", "", flush=False)

    def drop(self) -> None:
        """End a cancelled sequence: what it generated so far stays in its result."""
        self._finish("cancelled", "", flush=False)
