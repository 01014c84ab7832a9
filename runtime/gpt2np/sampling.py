"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

Sampling follows the usual order: divide the logits by the temperature, keep the top-k tokens,
then keep the smallest set of the most likely tokens whose probability reaches top-p, and draw
from what is left, renormalised (an exponential race: see `choose`). All of it runs in float64 with
NumPy's PCG64 generator, whose stream is the same on every platform: the same seed and the same
logits give the same token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import GPT2Error


@dataclass(frozen=True)
class Sampling:
    """How to choose tokens. The default, and `temperature=0`, is greedy (the most likely token).

    Giving `top_k` or `top_p` without a temperature samples at temperature 1.
    """

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise GPT2Error(f"temperature must be a number >= 0, got {t!r}")
        if k is not None and (type(k) is not int or k < 1):
            raise GPT2Error(f"top-k must be a whole number >= 1, got {k!r}")
        if p is not None and not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise GPT2Error(f"top-p must be in (0, 1], got {p!r}")
        if self.seed is not None and (type(self.seed) is not int or self.seed < 0):
            raise GPT2Error(f"seed must be a whole number >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        if self.temperature is None:
            return self.top_k is None and self.top_p is None
        return self.temperature == 0

    def rng(self) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(self.seed))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p for each token, in float64, over the last axis."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


def log_normalizer(logits: np.ndarray) -> tuple[np.floating, np.floating]:
    """(max, log Σ exp(logits − max)): log p = logit − max − the second. Computed once per row for
    `token_logprob` and `top_logprobs` together (it is a pass over the whole vocabulary)."""
    top = logits.max()
    return top, np.log(np.exp(logits - top).sum(dtype=np.float64))


def token_logprob(logits: np.ndarray, token: int, norm: tuple | None = None) -> float:
    """log p of one token: the same value as log_softmax(logits)[token], without a float64 copy
    of the whole vocabulary (this runs once per generated token). `norm`: `log_normalizer(logits)`."""
    top, log_sum = norm or log_normalizer(logits)
    return float(logits[token] - top - log_sum)


def top_logprobs(logits: np.ndarray, k: int, norm: tuple | None = None) -> dict[int, float]:
    """The k most likely tokens (ties by lower id) and their log-probabilities, most likely first."""
    top, log_sum = norm or log_normalizer(logits)
    lse = float(top) + float(log_sum)
    ids = _top(logits, k)
    return {int(i): float(logits[i]) - lse for i in ids}


def candidates(logits: np.ndarray, s: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """The tokens sampling may choose and their probabilities, most likely first.

    Ties are broken by token id, so the kept set is well defined.
    """
    z = logits.astype(np.float64) / (s.temperature if s.temperature else 1.0)
    n = len(z) if s.top_k is None else min(s.top_k, len(z))
    if s.top_p is None or s.top_p == 1:
        ids = _top(z, n)
    else:
        # top-p applies to the distribution left by top-k, renormalised.
        pool = z if s.top_k is None else z[_top(z, n)]
        total = np.exp(pool - z.max()).sum()
        # Grow a sorted prefix until it holds top-p of the mass: no full sort of the vocabulary.
        m = min(64, n)
        while True:
            ids = _top(z, m)
            mass = np.cumsum(np.exp(z[ids] - z.max())) / total
            if mass[-1] >= s.top_p or m == n:
                break
            m = min(2 * m, n)
        ids = ids[:min(int(np.searchsorted(mass, s.top_p)) + 1, len(ids))]
    p = np.exp(z[ids] - z[ids[0]])
    return ids, p / p.sum()


def _top(z: np.ndarray, m: int) -> np.ndarray:
    """The m largest entries of z, largest first, ties by lower index."""
    if m < len(z):
        part = np.argpartition(-z, m - 1)[:m]
        threshold = z[part].min()
        part = np.flatnonzero(z >= threshold)  # every tie at the threshold, so the cut is exact
    else:
        part = np.arange(len(z))
    order = np.lexsort((part, -z[part]))
    return part[order][:m]


def choose(logits: np.ndarray, s: Sampling, rng: np.random.Generator | None) -> int:
    """The next token: argmax (lowest id on ties) if greedy, else a draw from `candidates`.

    The draw is an exponential race: every token id j gets its own E_j ~ Exp(1) from the seeded
    stream, and the winner is the candidate with the largest z_j/T - log E_j, which is token j with
    probability p_j exactly. Unlike inverting a cumulative sum over the tokens sorted by
    probability, the result does not hinge on the order of nearly equal logits: the last-bit
    differences between a sequence decoded alone and in a batch (different BLAS paths) leave a
    seeded draw unchanged unless two tokens' race scores fall within those bits of each other.
    """
    if s.greedy:
        return int(np.argmax(logits))
    race = rng.standard_exponential(len(logits))
    np.log(race, out=race)
    if s.top_k is None and (s.top_p is None or s.top_p == 1):  # nothing is filtered: no sort needed
        score = logits / (s.temperature if s.temperature else 1.0) - race
        return int(np.argmax(score))
    ids, p = candidates(logits, s)
    return int(ids[np.argmax(np.log(p) - race[ids])])
