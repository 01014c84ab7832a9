"""Sampling's reference views, for the tests only: float64 log-softmax, and the set of tokens
sampling may choose (with their probabilities), from the sampler's own mask."""

from __future__ import annotations

import numpy as np

from gpt2np.sampling import Sampling, _weights


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p for each token, in float64, over the last axis."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


def allowed(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """The mask of the tokens sampling may choose (top-k, then top-p; ties by lower id)."""
    return _weights(logits, s)[1]


def candidates(logits: np.ndarray, s: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """The tokens sampling may choose, most likely first (ties by id), and their probabilities."""
    z = logits.astype(np.float64) / (s.temperature if s.temperature else 1.0)
    ids = np.flatnonzero(allowed(logits, s))
    ids = ids[np.lexsort((ids, -z[ids]))]
    p = np.exp(z[ids] - z[ids[0]])
    return ids, p / p.sum()
