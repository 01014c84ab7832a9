"""The Ray Data stages: `Generate` and `Score`, callable classes for `Dataset.map_batches` that
load the model once per actor and run each batch through the engine (see the package's docstring)."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Mapping

import numpy as np

from ..constraint import Constraint
from ..errors import GPT2Error
from ..score import check_stride
from .nodes import check_model_dir


def row_seed(seed: int, key: Any) -> int:
    """The seed of one row: from the job's `seed` and the row's key (its `id`: a JSON value),
    whatever the batch. A whole float is its int (Arrow makes floats of ints beside a null)."""
    if isinstance(key, float) and key.is_integer():
        key = int(key)
    if isinstance(key, np.generic):
        key = key.item()
    text = json.dumps(key, sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _column(batch: Mapping[str, Any], name: str) -> list:
    if name not in batch:
        raise GPT2Error(f"the batch has no {name!r} column (columns: {', '.join(map(str, batch))})")
    values = batch[name]
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _passed_errors(batch: Mapping[str, Any], n: int) -> list:
    """Errors that rows already carry from an earlier stage (None where none)."""
    if "error" not in batch:
        return [None] * n
    return [e if isinstance(e, str) and e else None for e in _column(batch, "error")]


def _output(batch: Mapping[str, Any], columns: dict[str, list]) -> dict:
    taken = [name for name in columns if name in batch and name != "error"]
    if taken:
        raise GPT2Error(f"the batch already has a column {taken[0]!r}, which would hold a result; rename it")
    out = {k: v for k, v in batch.items()}
    for name, values in columns.items():
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
        out[name] = arr
    return out


class Generate:
    """Generate a continuation of each row's prompt (a string, or a list of token ids).

    `model_dir`: a model folder, the same path on every node. `n_tokens` and `**options`: the
    generation options of `gpt2np.Options` (temperature, top_k, top_p, seed, stop, ...).
    `column`: where the prompts are (default "prompt"). `max_batch`: the most rows decoded
    together (default: the whole batch). A row may carry its own constraint in a `constraint`
    column (a `gpt2np.Constraint`, its dict such as `{"json": schema}`, or that dict as JSON
    text), in place of the option `constraint`; a bad one fails its row. New columns: `text`,
    `ids`, `finish_reason` (eos, stop, length or context), `logprobs` (of each generated token)
    and `error`. `weights`: their precision in the products (`gpt2np.load`'s).
    """

    def __init__(self, model_dir: str, n_tokens: int = 50, *, column: str = "prompt",
                 max_batch: int | None = None, verify: bool = True, expect_sums: str | None = None,
                 ids_as_json: bool = False, prefix_cache_mb: float | None = None, weights: str = "float32",
                 **options):
        self.model = check_model_dir(model_dir, verify, expect_sums, weights)
        self.options = self.model.options(n_tokens, **options)  # checked now, not at the first batch
        self.option_kwargs = {"n_tokens": n_tokens, **options}
        self.column, self.max_batch, self.ids_as_json = column, max_batch, ids_as_json
        self.prefix_cache = self.model.prefix_cache(prefix_cache_mb)  # the actor's, across its batches

    def __call__(self, batch: Mapping[str, Any]) -> dict:
        prompts = _column(batch, self.column)
        seeds = None
        if self.options.seed is not None and "id" in batch:
            keys = _column(batch, "id")
            if self.ids_as_json:  # gpt-batch keeps ids of any JSON type as text
                keys = [json.loads(k) for k in keys]
            seeds = [row_seed(self.options.seed, k) for k in keys]
        passed = _passed_errors(batch, len(prompts))
        constraints = None
        if "constraint" in batch:  # each row's own, where it has one
            constraints = [json.loads(c) if isinstance(c, str) else c if isinstance(c, (dict, Constraint))
                           else self.options.constraint for c in _column(batch, "constraint")]
        engine, seqs = self.model.queue([GPT2Error(e) if e else p for p, e in zip(prompts, passed)],
                                        strict=False, max_batch=self.max_batch, seeds=seeds, constraints=constraints,
                                        prefix_cache=self.prefix_cache, **self.option_kwargs)
        engine.run()
        results = [s.result for s in seqs]
        ok = [r.error is None for r in results]
        return _output(batch, {
            "text": [r.text if good else None for r, good in zip(results, ok)],
            "ids": [r.ids if good else None for r, good in zip(results, ok)],
            "finish_reason": [r.stop_reason if good else None for r, good in zip(results, ok)],
            "logprobs": [r.logprobs if good else None for r, good in zip(results, ok)],
            "error": [r.error for r in results],
        })


class Score:
    """Score each row's text: its token count, negative log-likelihood and perplexity.

    As `GPT2.score` defines them (the text follows `<|endoftext|>`; texts longer than the
    context use its sliding window with `stride`), by `GPT2.score_batch`: the batch's texts and
    their windows are read together by the engine, a few windows at a time. `column`: where the texts are (default
    "text"). New columns: `n_tokens`, `nll`, `perplexity` and `error`. `weights`: as `Generate`'s.
    """

    def __init__(self, model_dir: str, stride: int | None = None, *, column: str = "text", verify: bool = True,
                 expect_sums: str | None = None, prefix_cache_mb: float | None = None, weights: str = "float32"):
        self.model = check_model_dir(model_dir, verify, expect_sums, weights)
        self.stride, self.column = stride, column
        self.prefix_cache = self.model.prefix_cache(prefix_cache_mb)  # the actor's, across its batches
        check_stride(stride, self.model.config)  # now, not at the first long text

    def __call__(self, batch: Mapping[str, Any]) -> dict:
        texts = _column(batch, self.column)
        passed = _passed_errors(batch, len(texts))
        scores = self.model.score_batch([GPT2Error(e) if e else t for t, e in zip(texts, passed)], stride=self.stride,
                                        prefix_cache=self.prefix_cache)
        ok = [r.error is None for r in scores]
        return _output(batch, {
            "n_tokens": [len(r.ids) if good else None for r, good in zip(scores, ok)],
            "nll": [r.nll if good else None for r, good in zip(scores, ok)],
            "perplexity": [r.perplexity if good else None for r, good in zip(scores, ok)],
            "error": [r.error for r in scores],
        })
