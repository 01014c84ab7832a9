"""Scoring text: per-token log-probabilities, negative log-likelihood and perplexity.

Method. The text's tokens are preceded by `<|endoftext|>`, so that the first token is scored too
(GPT-2 saw that token between documents). Token i is scored by log p(t_i | t_<i). A text longer
than the context is scored with a sliding window of `n_positions` tokens that advances by
`stride` (below `n_positions`; default half of it): each window scores only the tokens no earlier
window scored, so every token is scored exactly once, with at least `n_positions - stride` tokens
of context once the first window is past. NLL is the sum of −log p over the text's tokens and
perplexity is exp(NLL / number of tokens).

Every window is a sequence of the engine that scores its prompt from its first unscored token
(`prompt_logprobs`), so texts and their windows are read together, in batches, by the same decode
loop and the same log-probability expression as echo and prompt log-probabilities.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

from .config import GPT2Config
from .engine import Engine
from .errors import GPT2Error
from .options import Options


@dataclass
class TextScore:
    """The score of one text: `logprobs[i]` is the natural log-probability of `ids[i]`; `window`
    and `stride` are the sliding window's. `error` says why a text of a batch could not be scored."""

    ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    stride: int = 0
    window: int = 0
    error: str | None = None

    @property
    def nll(self) -> float:
        return -math.fsum(self.logprobs)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / len(self.ids)) if self.ids and self.error is None else math.nan

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"ids": self.ids, "error": self.error}
        return {"ids": self.ids, "logprobs": self.logprobs, "n_tokens": len(self.ids), "nll": self.nll,
                "perplexity": self.perplexity, "window": self.window, "stride": self.stride}


def check_stride(stride: int | None, config: GPT2Config) -> int:
    """The sliding window's stride: `stride` if allowed (`GPT2Error` if not), else half the context."""
    size = config.n_positions
    stride = size // 2 if stride is None else stride
    if type(stride) is not int or not 1 <= stride < size:
        raise GPT2Error(f"stride must be a whole number from 1 to {size - 1}, got {stride!r}")
    return stride


def windows(length: int, size: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) of each window over a sequence of `length` tokens, the first of
    which (<|endoftext|>) is not scored: windows of `size` that advance by `stride`, each scoring
    the tokens from `first scored` to its end."""
    out, scored, begin = [], 1, 0
    while scored < length:
        end = min(begin + size, length)
        out.append((begin, end, scored))
        scored, begin = end, begin + stride
    return out


def score_all(engine: Engine, texts: list[list[int]], stride: int | None = None,
              max_batch: int | None = None) -> list[TextScore]:
    """Score each token-id list as the module docstring describes, every window of every text in
    one run of `engine`, at most `max_batch` windows at once (None: the engine's own limit, or
    all): a window joins as one finishes, and only its scored part is kept. A text that cannot be
    scored gets a `TextScore` with `error`."""
    config = engine.config
    stride = check_stride(stride, config)
    limit = max_batch or engine.max_batch or float("inf")
    scoring = Options(n_tokens=0, prompt_logprobs=0)
    results = [TextScore(list(ids), stride=stride, window=config.n_positions) for ids in texts]
    parts: list[list] = [[] for _ in texts]  # each text's windows' log-probabilities, in order
    todo = collections.deque()
    for i, ids in enumerate(texts):
        if not ids:
            results[i].error = "there is nothing to score: the text has no tokens"
            continue
        seq = [config.eos_token_id, *ids]
        for n, (b, e, first) in enumerate(windows(len(seq), config.n_positions, stride)):
            parts[i].append(None)
            todo.append((i, n, seq[b:e], first - b))
    running = 0

    def feed() -> None:
        nonlocal running
        while todo and running < limit:
            i, n, window, first = todo.popleft()
            engine.add(window, scoring, tag=(i, n, first), score_from=first)
            running += 1

    feed()
    for event in engine.events():
        s = event.sequence
        if not s.done:
            continue
        running -= 1
        i, n, first = s.tag
        if s.result.error is not None:
            results[i].error = results[i].error or s.result.error
        else:
            parts[i][n] = s.result.prompt_logprobs[first:]
        feed()
    for r, windows_lp in zip(results, parts):
        if r.error is None:
            r.logprobs = [lp for part in windows_lp for lp in part]
    return results
