"""One generation: its options (defined here, once, for every front door), its state while it
decodes (`Sequence`), and its outcome (`Generation`).

The loop that steps many sequences together is `gpt2np.engine.Engine`. A `Sequence` knows how to
turn the logits of its next position into a token, text, log-probabilities and a stopping point;
the engine decides which positions of which sequences go into each forward pass.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence as Seq

import numpy as np

from .config import GPT2Config
from .errors import GPT2Error
from .model import KVCache
from .sampling import Sampling, choose, log_normalizer, log_normalizers, token_logprob, top_logprobs
from .tokenizer import Tokenizer

STOP_REASONS = {
    "eos": "the model produced <|endoftext|>",
    "stop": "the text reached one of the stop strings",
    "length": "the requested number of tokens was generated",
    "context": "the model's context is full (use the sliding window to go on)",
    "cancelled": "the caller cancelled the generation",
    "error": "the generation failed: see its error",
}

MAX_TOP_LOGPROBS = 20


def check_ids(ids: Seq[int], config: GPT2Config) -> np.ndarray:
    """Token ids as an int64 array, each checked to be in the vocabulary."""
    try:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    except OverflowError:  # an integer past int64 is outside the vocabulary, not a non-integer
        bad = next((i for i in ids if isinstance(i, int) and not -2**63 <= i < 2**63), None)
        if bad is None:
            raise GPT2Error("token ids must be integers") from None
        raise GPT2Error(f"token id {bad} is outside the vocabulary (0..{config.vocab_size - 1})") from None
    except (TypeError, ValueError):
        raise GPT2Error("token ids must be integers") from None
    if arr.size and not (0 <= arr.min() and arr.max() < config.vocab_size):
        bad = next(int(i) for i in arr if not 0 <= i < config.vocab_size)
        raise GPT2Error(f"token id {bad} is outside the vocabulary (0..{config.vocab_size - 1})")
    return arr


# --------------------------------------------------------------------------------- the options
def _whole(low: int, high: int | None = None) -> Callable[[str, Any], None]:
    def check(name: str, v: Any) -> None:
        if type(v) is not int or v < low or (high is not None and v > high):
            span = f">= {low}" if high is None else f"from {low} to {high}"
            raise GPT2Error(f"{name} must be a whole number {span}, got {v!r}")
    return check


def _number(low: float, high: float) -> Callable[[str, Any], None]:
    def check(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
            raise GPT2Error(f"{name} must be a number from {low:g} to {high:g}, got {v!r}")
    return check


def _sampling_field(name: str, v: Any) -> None:
    Sampling(**{name: v})  # Sampling owns these rules and their messages


def _stops(name: str, v: Any) -> None:
    if not all(isinstance(s, str) and s for s in v):
        raise GPT2Error("stop strings must be non-empty strings")


def _bias(name: str, v: Any) -> None:
    for token, bias in v:
        if type(token) is not int or token < 0:
            raise GPT2Error(f"logit_bias keys must be token ids, got {token!r}")
        _number(-100, 100)(f"the logit bias of token {token}", bias)


def _flag(name: str, v: Any) -> None:
    if type(v) is not bool:
        raise GPT2Error(f"{name} must be true or false, got {v!r}")


def option(default: Any, help: str, check: Callable[[str, Any], None], cli: dict | None = None) -> Any:
    """A field of `Options`: its default, its rule, and (`cli`) how command lines spell it:
    `flag` (default `--name-with-dashes`), `type`, `metavar`, `multiple`, `is_flag`, `invert`."""
    return field(default=default, metadata={"help": help, "check": check, "cli": cli})


@dataclass(frozen=True)
class Options:
    """How to generate: the one definition of every generation option.

    The Python API takes these as keyword arguments, `gpt-run` and `gpt-batch` as flags (built from
    the `cli` entries below) and `gpt-serve` maps OpenAI's request fields onto them.
    """

    n_tokens: int = option(50, "How many tokens to generate at most.", _whole(0),
                           {"flag": "-n/--n-tokens", "type": int, "show_default": True})
    temperature: float | None = option(
        None, "Sample with this temperature (0 means greedy). Greedy is the default.", _sampling_field,
        {"type": float})
    top_k: int | None = option(None, "Sample only from the K most likely tokens.", _sampling_field,
                               {"type": int, "metavar": "K"})
    top_p: float | None = option(
        None, "Sample only from the smallest set of most likely tokens whose probability reaches P.",
        _sampling_field, {"type": float, "metavar": "P"})
    seed: int | None = option(None, "Seed for sampling: the same seed gives the same text.", _sampling_field,
                              {"type": int})
    stop: tuple[str, ...] = option((), "Stop when the text reaches TEXT, which is not printed. Repeat for several.",
                                   _stops, {"type": str, "multiple": True, "metavar": "TEXT"})
    stop_at_eos: bool = option(True, "Keep generating after <|endoftext|>.", _flag,
                               {"flag": "--ignore-eos", "is_flag": True, "invert": True})
    sliding_window: bool = option(
        False, "When the context is full, go on over its most recent half (recomputed) instead of stopping.",
        _flag, {"is_flag": True})
    presence_penalty: float = option(
        0.0, "Subtract P from the logit of every token already generated (-2 to 2).", _number(-2, 2),
        {"type": float, "metavar": "P"})
    frequency_penalty: float = option(
        0.0, "Subtract F times its count so far from each generated token's logit (-2 to 2).", _number(-2, 2),
        {"type": float, "metavar": "F"})
    logit_bias: tuple[tuple[int, float], ...] = option(
        (), "Add BIAS (-100 to 100) to token ID's logit before choosing; repeat for several.", _bias,
        {"type": str, "multiple": True, "metavar": "ID=BIAS"})
    logprobs: int = option(0, "Record the N most likely tokens and their log-probabilities at each new "
                              f"token (0 to {MAX_TOP_LOGPROBS}; shown with --json).",
                           _whole(0, MAX_TOP_LOGPROBS), {"type": int, "metavar": "N"})
    prompt_logprobs: int | None = option(
        None, "Score the prompt's tokens too, recording N alternatives at each (the first token has none).",
        lambda name, v: v is None or _whole(0, MAX_TOP_LOGPROBS)(name, v))

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if isinstance(self.logit_bias, Mapping):
            try:
                pairs = tuple((int(k), v) for k, v in self.logit_bias.items())
            except (TypeError, ValueError):
                raise GPT2Error("logit_bias keys must be token ids") from None
            object.__setattr__(self, "logit_bias", pairs)
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "logit_bias", tuple(tuple(p) for p in self.logit_bias))
        for f in fields(self):
            self.check(f.name, getattr(self, f.name))
        if self.prompt_logprobs is not None and self.sliding_window:
            raise GPT2Error("prompt log-probabilities and the sliding window do not go together")

    @classmethod
    def check(cls, name: str, value: Any) -> None:
        """Raise `GPT2Error` if `value` is not allowed for the option `name`."""
        cls.__dataclass_fields__[name].metadata["check"](name, value)

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p, self.seed)

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


# --------------------------------------------------------------------------------- the outcome
@dataclass
class Generation:
    """The outcome of one prompt.

    `ids` are all generated tokens (including an `<|endoftext|>` or the token that completed a
    stop string); `text` is what was streamed: their text up to, not including, the stop string
    or `<|endoftext|>`. `logprobs[i]` is the model's log-probability of `ids[i]` (temperature 1,
    before penalties, bias or filtering); with the option `logprobs=N`, `top_logprobs[i]` maps the
    N most likely token ids at that step to theirs. With `prompt_logprobs`, `prompt_logprobs[i]` is
    the log-probability of `prompt_ids[i]` given the tokens before it (None for the first).
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


class StopStrings:
    """Passes text through, holding back any tail that might be the start of a stop string.

    Generation stops at the stop string that is completed first (the earliest end; of those, the
    earliest start), which a stream can decide as it goes: the result does not depend on how the
    text is cut into pieces.
    """

    def __init__(self, stops: Seq[str]):
        self.stops = list(stops)
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text now safe to show, whether a stop string was reached). The stop string is not shown."""
        text = self.held + text
        hits = [(i + len(s), i) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)[1]], True
        # The longest tail of the text that begins a stop string, longest first; only prefixes
        # that end in the text's last character are compared.
        last = text[-1:]
        keep = max((next((k for k in range(min(len(s), len(text)), 0, -1)
                          if s[k - 1] == last and text.endswith(s[:k])), 0) for s in self.stops), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


# --------------------------------------------------------------------------------- one sequence
class Sequence:
    """One prompt's state while it waits, reads its prompt and decodes.

    `pending` holds the positions still to run before the next token can be chosen: the prompt
    (or the part of it not yet read), then one token at a time. The engine runs some or all of
    them and, once none is left, hands the logits of the last one to `accept`. `cancel()` may be
    called from any thread; the engine drops the sequence at its next step.
    """

    def __init__(self, prompt_ids: list[int], options: Options, config: GPT2Config, tokenizer: Tokenizer,
                 error: str | None = None):
        self.result = Generation(prompt_ids=list(prompt_ids))
        self.options, self.config, self.tokenizer = options, config, tokenizer
        self.context = list(prompt_ids)  # prompt and generated tokens: what a sliding window restarts from
        self.cancelled = False
        self.done = False
        self.cache: KVCache | None = None  # allocated when the engine admits the sequence
        self.submitted_at = time.perf_counter()
        self.admitted_at = self.first_token_at = self.finished_at = 0.0
        self.tag: Any = None  # for the caller: which request or prompt this is
        if error is not None:
            self.fail(error)
            return
        n = config.n_positions
        if not prompt_ids:
            raise GPT2Error("a prompt is empty (start it with <|endoftext|> for unconditional text)")
        check_ids(prompt_ids, config)
        for token, _ in options.logit_bias:
            if token >= config.vocab_size:
                raise GPT2Error(f"logit_bias names token {token}, outside the vocabulary (0..{config.vocab_size - 1})")
        if len(prompt_ids) > n and not options.sliding_window:
            raise GPT2Error(f"the prompt is {len(prompt_ids)} tokens; the model's context is {n} "
                            "(the sliding window keeps only the most recent part)")
        self.rng = options.sampling.rng()
        self.decoder = tokenizer.stream_decoder()
        self.stops = StopStrings(options.stop)
        self.counts: dict[int, int] = {}  # generated tokens, for the penalties
        self.scoring = options.prompt_logprobs is not None  # the prompt's own tokens are being scored
        if self.scoring:
            self.result.prompt_logprobs.append(None)
            self.result.prompt_top_logprobs.append(None)
        self.pending = np.asarray(self.context[-self.window:] if len(prompt_ids) > n else self.context, np.int64)
        self.reading = True  # pending holds a prompt (or a window to recompute), not one new token
        if options.n_tokens == 0 and not self.scoring:
            self._finish("length", "", flush=False)

    @property
    def window(self) -> int:
        """How many recent tokens a sliding window keeps when the context is full."""
        return self.config.n_positions // 2

    def cancel(self) -> None:
        self.cancelled = True

    def admit(self) -> None:
        """Take a place in the batch: allocate the cache for the prompt and every new token."""
        self.admitted_at = time.perf_counter()
        self.result.queue_s = self.admitted_at - self.submitted_at
        self._new_cache(len(self.pending))

    def _new_cache(self, n_ids: int) -> None:
        left = self.options.n_tokens - len(self.result.ids)
        self.cache = KVCache(self.config, min(self.config.n_positions, n_ids + left))

    def score_prompt(self, logits: np.ndarray, first: int) -> None:
        """Record the prompt's log-probabilities from the logits of its positions first, first+1, ...
        (position j predicts prompt token j + 1)."""
        opts, r, prompt = self.options, self.result, self.result.prompt_ids
        logits = logits[:max(0, len(prompt) - 1 - first)]  # the last prompt position predicts no prompt token
        if not len(logits):
            return
        for j, (row, norm) in enumerate(zip(logits, zip(*log_normalizers(logits))), start=first):
            r.prompt_logprobs.append(token_logprob(row, prompt[j + 1], norm))
            r.prompt_top_logprobs.append(top_logprobs(row, opts.prompt_logprobs, norm) if opts.prompt_logprobs else {})

    def accept(self, logits: np.ndarray, norm: tuple | None = None) -> tuple[int | None, str]:
        """Choose the next token from the logits of the last position; return it and the text it
        releases. A sequence that only scores its prompt (no new tokens) finishes here instead.
        `norm`: `log_normalizer(logits)`, if the caller made it (for a batch, in one pass)."""
        r, opts = self.result, self.options
        now = time.perf_counter()
        if not r.ids:
            self.first_token_at = now
            r.prefill_s = now - self.admitted_at
        self.scoring = self.reading = False
        if opts.n_tokens == 0:
            return None, self._finish("length", "", flush=False)
        z = self._adjusted(logits) if opts.adjusts_logits else logits
        token = choose(z, opts.sampling, self.rng)
        r.ids.append(token)
        norm = norm or log_normalizer(logits)
        r.logprobs.append(token_logprob(logits, token, norm))
        if opts.logprobs:
            r.top_logprobs.append(top_logprobs(logits, opts.logprobs, norm))
        self.context.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
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
            self.pending = np.asarray(self.context[-self.window:], np.int64)
            self.reading = True
            self._new_cache(len(self.pending))
        else:
            self.pending = np.array([token])
        r.text += text
        return token, text

    def _adjusted(self, logits: np.ndarray) -> np.ndarray:
        """The logits after OpenAI's penalties (on tokens generated so far) and the logit bias."""
        opts, z = self.options, logits.copy()
        if self.counts:
            ids = np.fromiter(self.counts, np.int64, len(self.counts))
            counts = np.fromiter(self.counts.values(), np.float32, len(self.counts))
            z[ids] -= np.float32(opts.frequency_penalty) * counts + np.float32(opts.presence_penalty)
        for token, bias in opts.logit_bias:
            z[token] += np.float32(bias)
        return z

    def _finish(self, reason: str, text: str, flush: bool = True) -> str:
        if flush:  # a trailing partial UTF-8 character, then anything held for the stop strings
            tail, stopped = self.stops.feed(self.decoder.flush())
            text += tail if stopped else tail + self.stops.flush()
            reason = "stop" if stopped else reason
        self.done = True
        self.cache = None  # the memory goes back now, not when the caller lets go of the sequence
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


def parse_logit_bias(items: Seq[str]) -> dict[int, float]:
    """`["50256=-100", "13=2.5"]` (the command-line form) -> {50256: -100.0, 13: 2.5}."""
    out = {}
    for item in items:
        token, sep, bias = item.partition("=")
        try:
            out[int(token)] = float(bias)
        except ValueError:
            raise GPT2Error(f"--logit-bias takes ID=BIAS (a token id and a number), got {item!r}") from None
        if not math.isfinite(out[int(token)]):
            raise GPT2Error(f"--logit-bias needs a finite bias, got {item!r}")
    return out
