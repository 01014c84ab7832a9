"""The decode loop: one batched pass over the prompt, then one position per new token."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from .config import GPT2Config
from .errors import GPT2Error
from .model import KVCache, Params, forward


def check_ids(ids: Sequence[int], config: GPT2Config) -> np.ndarray:
    """Token ids as an int64 array, each checked to be in the vocabulary."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size and not (0 <= arr.min() and arr.max() < config.vocab_size):
        bad = next(int(i) for i in arr if not 0 <= i < config.vocab_size)
        raise GPT2Error(f"token id {bad} is outside the vocabulary (0..{config.vocab_size - 1})")
    return arr


def generate_greedy(params: Params, config: GPT2Config, prompt_ids: Sequence[int], n_tokens: int,
                    stop_at_eos: bool = True) -> Iterator[int]:
    """Yield up to `n_tokens` token ids, each the most likely continuation (greedy).

    Stops early after yielding `<|endoftext|>` if `stop_at_eos`. The prompt must not be empty,
    and prompt plus new tokens must fit in the model's `n_positions`.
    """
    ids = check_ids(prompt_ids, config)
    if len(ids) == 0:
        raise GPT2Error("the prompt is empty (start with <|endoftext|> for unconditional text)")
    if n_tokens < 0:
        raise GPT2Error(f"the number of tokens must not be negative, got {n_tokens}")
    total = len(ids) + n_tokens
    if total > config.n_positions:
        raise GPT2Error(f"the prompt ({len(ids)} tokens) plus {n_tokens} new tokens is {total} positions; "
                        f"the model's context is {config.n_positions}")
    if n_tokens == 0:
        return
    cache = KVCache(config, capacity=total)
    logits = forward(params, config, ids, cache)
    for i in range(n_tokens):
        token = int(np.argmax(logits))
        yield token
        if (stop_at_eos and token == config.eos_token_id) or i == n_tokens - 1:
            return
        logits = forward(params, config, np.array([token]), cache)
