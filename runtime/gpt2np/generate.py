"""The decode loop: one batched pass over the prompts, then one position per new token.

Several prompts decode together: each step is one forward pass for all of them (one matrix product
per weight), while each keeps its own cache, sampler, stop rules and stopping point.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .config import GPT2Config
from .errors import GPT2Error
from .model import KVCache, Params, lm_head, transformer
from .sampling import Sampling, choose, token_logprob
from .tokenizer import Tokenizer

STOP_REASONS = {
    "eos": "the model produced <|endoftext|>",
    "stop": "the text reached one of the stop strings",
    "length": "the requested number of tokens was generated",
    "context": "the model's context is full (use the sliding window to go on)",
}


def check_ids(ids: Sequence[int], config: GPT2Config) -> np.ndarray:
    """Token ids as an int64 array, each checked to be in the vocabulary."""
    try:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        raise GPT2Error("token ids must be integers") from None
    if arr.size and not (0 <= arr.min() and arr.max() < config.vocab_size):
        bad = next(int(i) for i in arr if not 0 <= i < config.vocab_size)
        raise GPT2Error(f"token id {bad} is outside the vocabulary (0..{config.vocab_size - 1})")
    return arr


@dataclass(frozen=True)
class Options:
    """Everything about one generation call except the prompts."""

    n_tokens: int = 50
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True
    sliding_window: bool = False

    def __post_init__(self) -> None:
        if type(self.n_tokens) is not int or self.n_tokens < 0:
            raise GPT2Error(f"the number of tokens must be a whole number >= 0, got {self.n_tokens!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise GPT2Error("stop strings must be non-empty strings")


@dataclass
class Generation:
    """The outcome of one prompt.

    `ids` are all generated tokens (including an `<|endoftext|>` or the token that completed a
    stop string); `text` is what was streamed: their text up to, not including, the stop string
    or `<|endoftext|>`. `logprobs[i]` is the model's log-probability of `ids[i]` (temperature 1,
    before any filtering). `stop_reason` is a key of `STOP_REASONS`.
    """

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str = ""
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: the first token comes with the prompt pass, each later one costs a step."""
        return (len(self.ids) - 1) / self.decode_s if len(self.ids) > 1 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "ids": self.ids, "text": self.text, "logprobs": self.logprobs,
                "stop_reason": self.stop_reason,
                "timings": {"prefill_s": self.prefill_s, "decode_s": self.decode_s,
                            "tokens_per_s": self.tokens_per_s}}


class StopStrings:
    """Passes text through, holding back any tail that might be the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text now safe to show, whether a stop string was reached). The stop string is not shown."""
        text = self.held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1))
                    if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class _Sequence:
    """One prompt's state while it decodes."""

    def __init__(self, prompt_ids: list[int], options: Options, config: GPT2Config, tokenizer: Tokenizer):
        self.result = Generation(prompt_ids=list(prompt_ids))
        self.options, self.config = options, config
        self.context = list(prompt_ids)  # prompt and generated tokens: what a sliding window restarts from
        self.rng = options.sampling.rng()
        self.decoder = tokenizer.stream_decoder()
        self.stops = StopStrings(options.stop)
        self.done = options.n_tokens == 0
        if self.done:
            self.result.stop_reason = "length"
        n = config.n_positions
        if len(prompt_ids) > n and not options.sliding_window:
            raise GPT2Error(f"the prompt is {len(prompt_ids)} tokens; the model's context is {n} "
                            "(the sliding window keeps only the most recent part)")
        self._restart(self.context[-self.window:] if len(prompt_ids) > n else self.context)

    @property
    def window(self) -> int:
        """How many recent tokens a sliding window keeps when the context is full."""
        return self.config.n_positions // 2

    def _restart(self, ids: list[int]) -> None:
        left = self.options.n_tokens - len(self.result.ids)
        self.cache = KVCache(self.config, min(self.config.n_positions, len(ids) + left))
        self.pending = np.asarray(ids, dtype=np.int64)

    def accept(self, logits: np.ndarray) -> tuple[int, str]:
        """Choose the next token from `logits`; return it and the text it releases."""
        r, opts = self.result, self.options
        token = choose(logits, opts.sampling, self.rng)
        r.ids.append(token)
        r.logprobs.append(token_logprob(logits, token))
        self.context.append(token)
        if opts.stop_at_eos and token == self.config.eos_token_id:
            return token, self._finish("eos", "")
        text, stopped = self.stops.feed(self.decoder.feed(token))
        if stopped:
            return token, self._finish("stop", text, flush=False)
        if len(r.ids) == opts.n_tokens:
            return token, self._finish("length", text)
        if self.cache.length == self.config.n_positions:
            if not opts.sliding_window:
                return token, self._finish("context", text)
            self._restart(self.context[-self.window:])
        else:
            self.pending = np.array([token])
        r.text += text
        return token, text

    def _finish(self, reason: str, text: str, flush: bool = True) -> str:
        if flush:  # a trailing partial UTF-8 character, then anything held for the stop strings
            tail, stopped = self.stops.feed(self.decoder.flush())
            text += tail if stopped else tail + self.stops.flush()
            reason = "stop" if stopped else reason
        self.done = True
        self.result.stop_reason = reason
        self.result.text += text
        return text


class Decoder:
    """Decodes a batch of prompts together; checks everything before any work starts."""

    def __init__(self, params: Params, config: GPT2Config, tokenizer: Tokenizer,
                 prompts: Sequence[Sequence[int]], options: Options):
        for ids in prompts:
            if len(ids) == 0:
                raise GPT2Error("a prompt is empty (start it with <|endoftext|> for unconditional text)")
            check_ids(ids, config)
        self.params, self.config = params, config
        self.sequences = [_Sequence(list(ids), options, config, tokenizer) for ids in prompts]
        self.results = [s.result for s in self.sequences]

    def events(self) -> Iterator[tuple[int, int, str]]:
        """(prompt index, token, text it releases) for each token as it is chosen, in order."""
        started, first = time.perf_counter(), True
        active = [(i, s) for i, s in enumerate(self.sequences) if not s.done]
        while active:
            hidden = transformer(self.params, self.config, [(s.pending, s.cache) for _, s in active])
            logits = lm_head(self.params, np.concatenate(hidden))  # one product for the whole batch
            if first:
                prefilled = time.perf_counter()
                for _, s in active:
                    s.result.prefill_s = prefilled - started
                first = False
            for (i, s), row in zip(active, logits):
                token, text = s.accept(row)
                if s.done:
                    s.result.decode_s = time.perf_counter() - prefilled
                yield i, token, text
            active = [(i, s) for i, s in active if not s.done]
