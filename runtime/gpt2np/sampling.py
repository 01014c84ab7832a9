"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

Sampling follows the usual order: divide the logits by the temperature, keep the top-k tokens,
then keep the smallest set of the most likely tokens whose probability reaches top-p, and draw
from what is left, renormalised (an exponential race: see `choose`). Probabilities are float32 like
the logits and their sums float64 (float64 throughout at extreme temperatures). The draws come from
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


def log_normalizer(logits: np.ndarray) -> tuple[np.floating, np.floating]:
    """(max, log Σ exp(logits − max)): log p = logit − max − the second. Computed once per row for
    `token_logprob` and `top_logprobs` together (it is a pass over the whole vocabulary)."""
    (peak,), (log_sum,) = log_normalizers(logits[None])
    return peak, log_sum


def log_normalizers(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`log_normalizer` of each row of logits [N, V] (the arrays of the maxima and the log sums),
    in one pass over all rows: a batch's rows cost a few large operations, not N small ones. The
    exponentials go `_ROWS` rows at a time through one scratch block that stays in cache (the
    same operations on each row, so the same floats, as one row alone)."""
    peak = logits.max(axis=-1)
    log_sum = np.empty(len(logits))
    e = np.empty((min(len(logits), _ROWS), logits.shape[-1]), dtype=np.float32)
    for lo in range(0, len(logits), _ROWS):
        rows = logits[lo:lo + _ROWS]
        block = np.subtract(rows, peak[lo:lo + _ROWS, None], out=e[:len(rows)])
        np.exp(block, out=block)
        log_sum[lo:lo + len(block)] = block.sum(axis=-1, dtype=np.float64)
    return peak, np.log(log_sum)


_ROWS = 16  # rows of logits per block: [16, 50257] float32 is 3 MB


def logprob(logits, norm: tuple) -> np.ndarray:
    """log p of the given logits under their rows' `norm` (`log_normalizer`, or the arrays of
    `log_normalizers` for one logit per row): (logit − max) − log Σ exp(logits − max), in float64.

    This is the one expression for a token's log-probability: every value reported anywhere (a
    generated token's, its alternatives', the prompt's, a score's) comes from it, evaluated in the
    same order, so the same token at the same position always shows the same float (a client may
    compare them with ==, as lm-evaluation-harness does to decide `is_greedy`)."""
    peak, log_sum = norm
    return (np.asarray(logits, dtype=np.float64) - np.asarray(peak, dtype=np.float64)) - np.asarray(log_sum, np.float64)


def token_logprob(logits: np.ndarray, token: int, norm: tuple | None = None) -> float:
    """log p of one token: `logprob` of its logit (no float64 copy of the whole vocabulary: this
    runs once per generated token). `norm`: `log_normalizer(logits)`, if the caller made it."""
    return float(logprob(logits[token], norm or log_normalizer(logits)))


def top_logprobs(logits: np.ndarray, k: int, norm: tuple | None = None) -> dict[int, float]:
    """The k most likely tokens (ties by lower id) and their log-probabilities (`logprob`, so a
    token's entry here equals its `token_logprob`), most likely first."""
    ids = _top(logits, k)
    values = logprob(logits[ids], norm or log_normalizer(logits))
    return {int(i): float(v) for i, v in zip(ids, values)}


def _weights(logits: np.ndarray, s: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """(w, keep): w_j = exp((logit_j − max logit) / temperature), the probabilities up to one
    common factor, and the mask of the tokens sampling may choose (the top-k, then of those the
    smallest set of the most likely whose probability reaches top-p; ties at either cut by lower
    id); w is −1 where not allowed. In float32 like the logits
    (their sums in float64) for temperatures from 0.01 to 100; in float64 beyond, where float32
    would lose the smallest or the largest temperatures' differences."""
    t = s.temperature if s.temperature else 1.0
    z = logits - logits.max()  # <= 0: exp cannot overflow, and the most likely token weighs 1
    if not _FLOAT32_TEMPERATURES[0] <= t <= _FLOAT32_TEMPERATURES[1]:
        z = z.astype(np.float64)
    z /= t
    w = np.exp(z, out=z)
    keep = np.ones(len(w), dtype=bool)
    if s.top_k is not None and s.top_k < len(w):
        keep = _largest(logits, s.top_k)  # the order of the logits: the same at every temperature
        w[~keep] = -1.0  # below every allowed weight (those are >= 0)
    if s.top_p is not None and s.top_p < 1:
        ranked = np.sort(w[keep] if s.top_k is not None else w)[::-1]
        mass = np.cumsum(ranked, dtype=np.float64)
        n = min(int(np.searchsorted(mass, s.top_p * mass[-1])) + 1, len(mass))
        keep = _largest(w, n, cut=ranked[n - 1])
        w[~keep] = -1.0
    return w, keep


_FLOAT32_TEMPERATURES = (0.01, 100.0)


def _largest(v: np.ndarray, n: int, cut: float | None = None) -> np.ndarray:
    """A mask of the n largest entries of v; of those equal to the n-th largest (`cut`, if the
    caller knows it), the lowest indices."""
    if n >= len(v):
        return np.ones(len(v), dtype=bool)
    if cut is None:
        cut = np.partition(v, len(v) - n)[len(v) - n]
    keep = v > cut
    ties = np.flatnonzero(v == cut)[:n - int(np.count_nonzero(keep))]
    keep[ties] = True
    return keep


def _top(z: np.ndarray, m: int) -> np.ndarray:
    """The m largest entries of z, largest first, ties by lower index."""
    ids = np.flatnonzero(_largest(z, m))
    return ids[np.lexsort((ids, -z[ids]))]


def top_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of each row's k largest logits [N, k], largest first, ties by lower id (the order
    `top_logprobs` uses), for all rows at once; a row with ties at the cut is done alone.

    The vocabulary is split into m interleaved groups of `_GROUP` ids (g, g + m, g + 2m, ...:
    their maxima are one fast reduction). Only the k groups with the largest maxima can hold a row's k
    largest logits (any other group's maximum is below k larger ones), so the partition runs over
    those k groups' members instead of the whole vocabulary."""
    n, V = logits.shape
    k = min(k, V)
    m = V // _GROUP  # groups; the last V - m·_GROUP ids are candidates always
    if k < m // 2:
        maxima = logits[:, :m * _GROUP].reshape(n, _GROUP, m).max(axis=1)
        best = np.argpartition(maxima, m - k, axis=1)[:, -k:]
        pool = (best[:, :, None] + m * np.arange(_GROUP)).reshape(n, k * _GROUP)
        pool = np.concatenate([pool, np.broadcast_to(np.arange(m * _GROUP, V), (n, V - m * _GROUP))], axis=1)
    else:
        maxima, pool = None, np.broadcast_to(np.arange(V), (n, V))
    values = np.take_along_axis(logits, pool, axis=1)
    picked = np.argpartition(values, values.shape[1] - k, axis=1)[:, -k:]
    part, chosen = np.take_along_axis(pool, picked, axis=1), np.take_along_axis(values, picked, axis=1)
    cut = chosen.min(axis=1)[:, None]
    # More than k logits >= the cut: within the pool, or in a group left out (then more than k
    # groups reach the cut).
    ties = np.count_nonzero(values >= cut, axis=1) > k
    if maxima is not None:
        ties |= np.count_nonzero(maxima >= cut, axis=1) > k
    order = np.lexsort((part, -chosen), axis=1)
    out = np.take_along_axis(part, order, axis=1)
    for i in np.flatnonzero(ties):
        out[i] = _top(logits[i], k)
    return out


_GROUP = 64


def choose(logits: np.ndarray, s: Sampling, rng: np.random.Generator | None) -> int:
    """The next token: argmax (lowest id on ties) if greedy, else a draw from the `allowed` tokens.

    The draw is an exponential race: every token id j gets its own E_j ~ Exp(1) from the seeded
    stream, and the winner is the allowed token with the largest z_j/T - log E_j, which is token j with
    probability p_j exactly. Unlike inverting a cumulative sum over the tokens sorted by
    probability, the result does not hinge on the order of nearly equal logits: the last-bit
    differences between a sequence decoded alone and in a batch (different BLAS paths) leave a
    seeded draw unchanged unless two tokens' race scores fall within those bits of each other.
    """
    if s.greedy:
        return int(np.argmax(logits))
    race = rng.standard_exponential(len(logits))
    w, _ = _weights(logits, s)
    # argmax of z_j − log E_j is argmax of w_j / E_j: the same race without a logarithm.
    return int(np.argmax(np.divide(w, race, out=race)))
