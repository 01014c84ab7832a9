"""GPT-2 as a stage of a Ray Data pipeline (the extra `gpt2np[ray]`): `Generate` and `Score`.

Callable classes for `Dataset.map_batches` with an actor pool, as in Ray Data's batch-inference
guide: each actor loads the model folder once (a memory map, so every actor on a node shares the
same page-cache pages) and runs each batch through the engine's decode loop, the one that
`GPT2.generate_batch` uses::

    import ray
    from ray.data import ActorPoolStrategy
    from gpt2np.ray import Generate

    ds = ray.data.read_json("prompts.jsonl")                 # a "prompt" column, and any others
    ds = ds.map_batches(Generate, fn_constructor_kwargs={"model_dir": "/models/124M", "n_tokens": 40,
                                                         "temperature": 0.8, "seed": 1},
                        compute=ActorPoolStrategy(size=2), batch_size=16, num_cpus=1)
    ds.write_json("out/")

A batch is a dict of columns (Ray's "numpy" or "pandas" batch format). The other columns pass
through unchanged; the results are new columns. A row that cannot be done (a prompt too long, bad
ids, not text) gets its one-line message in an `error` column, and the rest of the batch goes on;
a row that arrives with an `error` already (from an earlier stage) is passed through untouched.

The model folder must be readable at the same path on every node. An actor checks it when it
starts, and its files against `SHA256SUMS` when the folder has one (`verify=False` skips that;
`expect_sums=sums_digest(folder)` also requires every node's SHA256SUMS to be the same): a missing
or different folder fails the actor with one line that names the node.

With a `seed`, each row's random stream comes from the seed and the row's `id` column
(`row_seed(seed, id)`), so it does not depend on which actor or batch the row lands in; without
an `id` column every row uses the seed itself, as `generate_batch` does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import socket
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import GPT2Error
from ..score import check_stride

__all__ = ["Generate", "Score", "row_seed", "check_model_dir", "sums_digest"]


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


def sums_digest(model_dir: str | Path) -> str:
    """A digest of the folder's SHA256SUMS ("" without one): equal digests, equal copies."""
    from ..integrity import SUMS_FILE

    try:
        return hashlib.sha256((Path(model_dir) / SUMS_FILE).read_bytes()).hexdigest()
    except OSError:
        return ""


def node_name() -> str:
    """This node, as an error message names it: its Ray node IP (or host name) and id."""
    try:
        import ray

        ctx = ray.get_runtime_context()
        return f"{ray.util.get_node_ip_address()} ({ctx.get_node_id()[:12]})"
    except Exception:  # noqa: BLE001 -- outside Ray: the host is name enough
        return socket.gethostname()


def check_model_dir(model_dir: str | Path, verify: bool = True, expect_sums: str | None = None):
    """Load the model folder here, after checking its files against SHA256SUMS if it has one
    (and, with `expect_sums`, that SHA256SUMS is the other nodes'); `GPT2Error` naming this node
    if it is missing or differs."""
    import gpt2np
    from ..integrity import SUMS_FILE
    from ..integrity import verify as verify_sums

    folder = Path(model_dir)
    try:
        if expect_sums is not None and folder.is_dir() and sums_digest(folder) != expect_sums:
            raise GPT2Error(f"{folder}: its SHA256SUMS differs from the copy on the first node checked")
        if verify and (folder / SUMS_FILE).is_file():
            bad = [f"{name} {status}" for name, status in verify_sums(folder) if status != "ok"]
            if bad:
                raise GPT2Error(f"{folder}: files differ from its SHA256SUMS: {', '.join(bad)}")
        return gpt2np.load(folder)
    except GPT2Error as e:
        raise GPT2Error(f"on node {node_name()}: {e}") from None


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
    together (default: the whole batch). New columns: `text`, `ids`, `finish_reason` (eos, stop,
    length or context), `logprobs` (of each generated token) and `error`.
    """

    def __init__(self, model_dir: str, n_tokens: int = 50, *, column: str = "prompt",
                 max_batch: int | None = None, verify: bool = True, expect_sums: str | None = None,
                 ids_as_json: bool = False, **options):
        self.model = check_model_dir(model_dir, verify, expect_sums)
        self.options = self.model.options(n_tokens, **options)
        self.column, self.max_batch, self.ids_as_json = column, max_batch, ids_as_json

    def __call__(self, batch: Mapping[str, Any]) -> dict:
        prompts = _column(batch, self.column)
        keys = _column(batch, "id") if "id" in batch else None
        if keys is not None and self.ids_as_json:  # gpt-batch keeps ids of any JSON type as text
            keys = [json.loads(k) for k in keys]
        passed = _passed_errors(batch, len(prompts))
        engine, seqs = self.model.engine(max_batch=self.max_batch), []
        for i, prompt in enumerate(prompts):
            opts = self.options
            if opts.seed is not None and keys is not None:
                opts = dataclasses.replace(opts, seed=row_seed(opts.seed, keys[i]))
            try:
                if passed[i]:
                    raise GPT2Error(passed[i])
                seqs.append(engine.add(self._ids(prompt), opts))
            except GPT2Error as e:
                seqs.append(engine.add_failed([], opts, str(e)))
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

    def _ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.model.encode(prompt) or [self.model.config.eos_token_id]
        if isinstance(prompt, (list, tuple, np.ndarray)):
            return self.model._ids(list(prompt))
        raise GPT2Error(f"a prompt must be text or a list of token ids, not {type(prompt).__name__}")


class Score:
    """Score each row's text: its token count, negative log-likelihood and perplexity.

    As `GPT2.score` defines them (the text follows `<|endoftext|>`; texts longer than the
    context use its sliding window with `stride`). Texts that fit the context are scored
    together, in one forward pass of the engine per batch. `column`: where the texts are (default
    "text"). New columns: `n_tokens`, `nll`, `perplexity` and `error`.
    """

    def __init__(self, model_dir: str, stride: int | None = None, *, column: str = "text", verify: bool = True,
                 expect_sums: str | None = None):
        self.model = check_model_dir(model_dir, verify, expect_sums)
        self.stride, self.column = stride, column
        check_stride(stride, self.model.config)  # now, not at the first long text

    def __call__(self, batch: Mapping[str, Any]) -> dict:
        texts = _column(batch, self.column)
        passed = _passed_errors(batch, len(texts))
        model, eos = self.model, self.model.config.eos_token_id
        scoring = model.options(0, prompt_logprobs=0)
        engine = model.engine()
        rows: list[tuple[str, Any]] = []  # ("engine", sequence) | ("window", Score) | ("error", message)
        for text, error in zip(texts, passed):
            try:
                if error:
                    raise GPT2Error(error)
                if not isinstance(text, str):
                    raise GPT2Error(f"a text to score must be a string, not {type(text).__name__}")
                ids = model.encode(text)
                if not ids:
                    raise GPT2Error("there is nothing to score: the text has no tokens")
                if len(ids) + 1 <= model.config.n_positions:
                    rows.append(("engine", engine.add([eos, *ids], scoring)))
                else:
                    rows.append(("window", model.score(ids, stride=self.stride)))
            except GPT2Error as e:
                rows.append(("error", str(e)))
        engine.run()
        n_tokens, nll, error = [], [], []
        for kind, value in rows:
            if kind == "engine" and value.result.error is None:
                lp = value.result.prompt_logprobs[1:]
                n_tokens.append(len(lp))
                nll.append(-math.fsum(lp))
                error.append(None)
            elif kind == "window":
                n_tokens.append(len(value.ids))
                nll.append(value.nll)
                error.append(None)
            else:
                n_tokens.append(None)
                nll.append(None)
                error.append(value if kind == "error" else value.result.error)
        return _output(batch, {
            "n_tokens": n_tokens, "nll": nll,
            "perplexity": [math.exp(v / n) if v is not None else None for v, n in zip(nll, n_tokens)],
            "error": error,
        })
