"""Scoring text: per-token log-probabilities, negative log-likelihood and perplexity.

Method. The text's tokens are preceded by `<|endoftext|>`, so that the first token is scored too
(GPT-2 saw that token between documents). Token i is scored by log p(t_i | t_<i). A text longer
than the context is scored with a sliding window of `n_positions` tokens that advances by
`stride` (below `n_positions`; default half of it): each window scores only the tokens no earlier window
scored, so every token is scored exactly once, with at least `n_positions - stride` tokens of
context once the first window is past. NLL is the sum of −log p over the text's tokens and
perplexity is exp(NLL / number of tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import GPT2Config
from .errors import GPT2Error
from .model import KVCache, Params, lm_head, transformer
from .sampling import log_normalizers, logprob

_ROWS_PER_HEAD_PRODUCT = 256  # logits are made this many rows at a time: [256, 50257] is 51 MB


@dataclass
class Score:
    ids: list[int]
    logprobs: list[float]  # natural log, one per token of `ids`
    stride: int
    window: int

    @property
    def nll(self) -> float:
        return -math.fsum(self.logprobs)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / len(self.ids))

    def to_dict(self) -> dict:
        return {"ids": self.ids, "logprobs": self.logprobs, "n_tokens": len(self.ids), "nll": self.nll,
                "perplexity": self.perplexity, "window": self.window, "stride": self.stride}


def check_stride(stride: int | None, config: GPT2Config) -> int:
    """The sliding window's stride: `stride` if allowed (`GPT2Error` if not), else half the context."""
    window = config.n_positions
    stride = window // 2 if stride is None else stride
    if type(stride) is not int or not 1 <= stride < window:
        raise GPT2Error(f"stride must be a whole number from 1 to {window - 1}, got {stride!r}")
    return stride


def score(params: Params, config: GPT2Config, ids: list[int], stride: int | None = None) -> Score:
    """Score token ids as the module docstring describes."""
    window = config.n_positions
    stride = check_stride(stride, config)
    if not ids:
        raise GPT2Error("there is nothing to score: the text has no tokens")
    seq = np.asarray([config.eos_token_id, *ids], dtype=np.int64)
    logprobs: list[float] = []
    scored, begin = 1, 0  # seq[:scored] needs no score; windows start at `begin`
    while scored < len(seq):
        end = min(begin + window, len(seq))
        h = transformer(params, config, [(seq[begin:end], KVCache(config, end - begin))], all_positions=True)[0]
        # The hidden state at position j predicts seq[j + 1].
        for lo in range(scored, end, _ROWS_PER_HEAD_PRODUCT):
            hi = min(lo + _ROWS_PER_HEAD_PRODUCT, end)
            logits = lm_head(params, h[lo - 1 - begin:hi - 1 - begin])
            logprobs += logprob(logits[np.arange(hi - lo), seq[lo:hi]], log_normalizers(logits)).tolist()
        scored, begin = end, begin + stride
    return Score(ids=list(ids), logprobs=logprobs, stride=stride, window=window)
