"""The Python API: `load` a model folder, then encode, decode, generate, score and trace with
`GPT2`. `gpt2np/__init__.py` re-exports what is public here."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from . import matmul, reference
from .config import GPT2Config
from .constraint import backend as constraint_backend
from .engine import Engine
from .errors import GPT2Error
from .kv import KVCache
from .model import forward
from .options import Options
from .params import Params
from .prefix_cache import PrefixCache
from .prompts import check_ids, prompt_ids, text_ids
from .reference import Trace
from .score import TextScore, score_all
from .sequence import Generation, SequenceState
from .tokenizer import Tokenizer
from .weights import load_gpt2_weights, release_pages

SCORE_BATCH = 8  # scoring windows read together: each holds a cache of up to the whole context

MODEL_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise GPT2Error(f"{path}: not a model folder (no such directory)")
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if missing:
        hint = ""
        if "model.safetensors" in missing and (path / "model.safetensors.index.json").exists():
            hint = " (sharded checkpoints are not supported: save with a max_shard_size above the model size)"
        elif "model.safetensors" in missing and (path / "pytorch_model.bin").exists():
            hint = " (pytorch_model.bin is a pickle file, which this runtime does not load: " \
                   "save the model with safe_serialization=True)"
        raise GPT2Error(f"{path}: not a model folder: missing {', '.join(missing)}{hint}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load only the tokenizer (`vocab.json`, `merges.txt`) of a model folder."""
    path = Path(path)
    return Tokenizer.from_files(path / "vocab.json", path / "merges.txt")


def load(path: str | Path, matmul_backend: str | None = None, weights: str = "float32") -> "GPT2":
    """Load a model folder. The weights are memory-mapped, not read: this takes milliseconds; with
    the oneDNN backend (`gpt2np.matmul`), they are read once into its layout (`model.matmul` says
    which backend runs and what packing cost). `matmul_backend`: "numpy", "onednn" or "auto" in
    place of the environment's `GPT2NP_MATMUL`. `weights`: "float32" (the file's, exact), or
    "bfloat16" or "int8", a copy made once here for faster products (oneDNN's; `GPT2Error` where
    it cannot run). The folder stays float32; embeddings, layer norms, attention and the KV cache
    stay float32 at every precision (docs/performance.md gives each precision's measured error)."""
    path = Path(path)
    _check_folder(path)
    config = GPT2Config.from_file(path / "config.json")
    tokenizer = load_tokenizer(path)
    if tokenizer.n_vocab != config.vocab_size:
        raise GPT2Error(f"{path}: vocab.json has {tokenizer.n_vocab} tokens but config.json says "
                        f"vocab_size {config.vocab_size}")
    tensors, metadata = load_gpt2_weights(path / "model.safetensors", config)
    params, choice = matmul.prepare(Params.from_weights(tensors, config), release=release_pages,
                                    backend=matmul_backend, weights=weights)
    model = GPT2(config, params, tokenizer, metadata)
    model.matmul = choice
    return model


class TextStream:
    """The text of one generation, piece by piece as it is produced; iterate over it.

    Pieces never split a UTF-8 character and never show part of a stop string. `result` is the
    `Generation` (ids, text, log-probabilities, stop reason, timings), complete after iteration.
    """

    def __init__(self, engine: Engine, sequences: list[SequenceState]):
        self._events = engine.events()
        self.result: Generation = sequences[0].result

    def __iter__(self) -> Iterator[str]:
        for event in self._events:
            if event.text:
                yield event.text
            if event.sequence.result.error is not None:
                raise GPT2Error(event.sequence.result.error)


class GPT2:
    """A loaded GPT-2: its config, weights (`params`) and tokenizer.

    Generation methods take the fields of `gpt2np.Options` as keyword arguments: the one list
    of generation options, each with its default, meaning and rule (`Options.table()` lists them;
    docs/api.md shows that table).
    """

    def __init__(self, config: GPT2Config, params: Params, tokenizer: Tokenizer,
                 metadata: dict[str, str] | None = None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.metadata = metadata or {}
        self.matmul = matmul.Choice()  # which backend runs the weight products (`load` sets it)

    def encode(self, text: str, *, allowed_special: bool | Iterable[str] = False, limit: int | None = None) -> list[int]:
        """Token ids of `text` (see `Tokenizer.encode`; `<|endoftext|>` is plain text by default;
        `limit`: refuse, as early as possible, a text that needs more tokens)."""
        return self.tokenizer.encode(text, allowed_special=allowed_special, limit=limit)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; invalid UTF-8 byte sequences become U+FFFD."""
        return self.tokenizer.decode(ids)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits after every position of `ids`: float32 [len(ids), vocab_size]."""
        arr = check_ids(ids, self.config)
        if not 0 < len(arr) <= self.config.n_positions:
            raise GPT2Error(f"logits needs 1 to {self.config.n_positions} tokens, got {len(arr)}")
        return forward(self.params, self.config, arr, KVCache(self.config, len(arr)), all_logits=True)

    def trace(self, ids: str | Sequence[int]) -> Trace:
        """The inside of one forward pass over `ids` (text, or 1 to n_positions token ids):
        `Trace.hidden_states` [n_layer + 1, T, n_embd] (the embeddings, then each block's output,
        the last one after `ln_f`, as Hugging Face defines them), `Trace.attentions`
        [n_layer, n_head, T, T] (softmax probabilities, zero above the diagonal) and
        `Trace.logits` [T, vocab_size], all float32. It runs `gpt2np.reference`, the plain
        full-recompute forward pass that reads like the math (its logits equal `logits(ids)`)."""
        arr = np.asarray(text_ids(ids, self.tokenizer, self.config), np.int64)
        if not 0 < len(arr) <= self.config.n_positions:
            raise GPT2Error(f"trace needs 1 to {self.config.n_positions} tokens, got {len(arr)}")
        return reference.trace(self.params, self.config, arr)

    def prompt_ids(self, prompt: str | Sequence[int], *, special: bool = False, limit: int | None = None) -> list[int]:
        """A prompt's token ids, by the one rule every front door uses (`gpt2np.prompts.prompt_ids`):
        text is encoded, empty text is `<|endoftext|>`, ids are checked against the vocabulary;
        `special`: `<|endoftext|>` in the text is the special token; `limit`: text that needs
        more tokens raises `TokenLimitError` without being encoded whole."""
        return prompt_ids(prompt, self.tokenizer, self.config, special=special, limit=limit)

    def options(self, n_tokens: int = 50, **options) -> Options:
        """The generation options (see `gpt2np.options.Options`), checked; a constraint is compiled
        now (and kept in the compile cache), so that a bad one fails before any prompt runs."""
        opts = Options(n_tokens=n_tokens, **options)
        if opts.constraint is not None:
            constraint_backend().compile_constraint(opts.constraint, self.tokenizer)
        return opts

    def engine(self, max_batch: int | None = None, prefill_chunk: int | None = None,
               prefix_cache: PrefixCache | float | None = None, *, max_batched_tokens: int | None = None,
               prefill_stall: float | None = None) -> Engine:
        """A decode loop over this model, for callers that add and step sequences themselves
        (a server, a pipeline stage). See `gpt2np.engine.Engine` for the step budget
        (`max_batch`, `max_batched_tokens`, `prefill_chunk`, `prefill_stall`). `prefix_cache`: a
        prefix cache to use (engines may share one), or a number of MB for a new one (0 or None: none)."""
        return Engine(self.params, self.config, self.tokenizer, max_batch=max_batch, prefill_chunk=prefill_chunk,
                      prefix_cache=self.prefix_cache(prefix_cache), max_batched_tokens=max_batched_tokens,
                      prefill_stall=prefill_stall)

    def prefix_cache(self, budget: PrefixCache | float | None) -> PrefixCache | None:
        """A prefix cache for this model of `budget` MB (`gpt2np.prefix_cache`); a cache passes
        through, and None or 0 means none."""
        if budget is None or isinstance(budget, PrefixCache):
            return budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
            raise GPT2Error(f"prefix_cache must be a number of MB >= 0, got {budget!r}")
        return PrefixCache(self.config, int(budget * 2**20)) if budget else None

    def queue(self, prompts: Sequence[str | Sequence[int] | GPT2Error], n_tokens: int = 50, *,
              strict: bool = True, max_batch: int | None = None, seeds: Sequence[int] | None = None,
              constraints: Sequence | None = None, prefix_cache: PrefixCache | float | None = None,
              **options) -> tuple[Engine, list[SequenceState]]:
        """A new engine holding `prompts`, not yet run, and their sequences in order.

        `strict`: a prompt that cannot run raises `GPT2Error` (nothing runs); otherwise it becomes
        a sequence that ends at once with an error, and the others run. A prompt given as a
        `GPT2Error` is one already known to fail (an earlier stage's error): it ends so. `seeds`:
        each prompt's own seed, in place of the option `seed`; `constraints`: each prompt's own
        constraint (a `Constraint`, its dict, or None), in place of the option `constraint` (a bad
        one fails its prompt as a bad prompt does). `prefix_cache`: see `engine`.
        """
        opts = self.options(n_tokens, **options)
        engine, seqs = self.engine(max_batch=max_batch, prefix_cache=prefix_cache), []
        for i, p in enumerate(prompts):
            own = opts if seeds is None else dataclasses.replace(opts, seed=seeds[i])
            try:
                if constraints is not None:
                    own = dataclasses.replace(own, constraint=constraints[i])
                if isinstance(p, GPT2Error):
                    raise p
                seqs.append(engine.add(self.prompt_ids(p), own, tag=i))
            except GPT2Error as e:
                if strict:
                    raise
                ids = [] if isinstance(p, (str, GPT2Error)) or not _all_ints(p) else list(p)
                seqs.append(engine.add_failed(ids, own, str(e), tag=i))
        return engine, seqs

    def generate(self, prompt: str | Sequence[int], n_tokens: int = 50, **options) -> TextStream:
        """Stream the continuation of `prompt` (text or token ids) as text pieces.

        Everything is checked when called; the work happens as you iterate. See the class
        docstring for the options. The pieces join to `result.text`.
        """
        return TextStream(*self.queue([prompt], n_tokens, **options))

    def generate_ids(self, prompt: str | Sequence[int], n_tokens: int = 50, **options) -> Iterator[int]:
        """Yield the generated token ids as each is chosen (including a final `<|endoftext|>`)."""
        engine, _ = self.queue([prompt], n_tokens, **options)
        return (event.token for event in engine.events() if event.token is not None)

    def complete(self, prompt: str | Sequence[int], n_tokens: int = 50, **options) -> Generation:
        """Generate to the end and return the `Generation`."""
        engine, (seq,) = self.queue([prompt], n_tokens, **options)
        engine.run()
        if seq.result.error is not None:
            raise GPT2Error(seq.result.error)
        return seq.result

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], n_tokens: int = 50, *,
                       max_batch: int | None = None, prefix_cache: PrefixCache | float | None = None,
                       **options) -> list[Generation]:
        """Generate for several prompts at once, in one forward pass per step; results in order.

        Each prompt has its own length, cache, stop rules and random stream (a `seed` gives every
        prompt the stream it would have alone), so each result equals what `complete` gives. A
        prompt that cannot run (too long, bad ids) gets a result with `error` set and stop reason
        "error"; the others run. `max_batch` caps the prompts in one pass (the rest join as others
        finish); by default all run together. `prefix_cache`: see `engine`. Bad options raise
        `GPT2Error`.
        """
        engine, seqs = self.queue(prompts, n_tokens, strict=False, max_batch=max_batch, prefix_cache=prefix_cache,
                                  **options)
        engine.run()
        return [s.result for s in seqs]

    def score(self, text: str | Sequence[int], *, stride: int | None = None,
              prefix_cache: PrefixCache | float | None = None) -> TextScore:
        """Per-token log-probabilities, NLL and perplexity of `text` (see `gpt2np.score`)."""
        (result,) = self.score_batch([text], stride=stride, strict=True, max_batch=1,  # one window's memory
                                     prefix_cache=prefix_cache)
        return result

    def score_batch(self, texts: Sequence[str | Sequence[int]], *, stride: int | None = None,
                    strict: bool = False, max_batch: int = SCORE_BATCH,
                    prefix_cache: PrefixCache | float | None = None) -> list[TextScore]:
        """`score` of each text, read together: every window of every text is a sequence of one
        engine run, at most `max_batch` at once (each holds a KV cache of up to the context). A text that cannot be scored gets a result with
        `error` (with `strict`, a `GPT2Error`); so does a text given as a `GPT2Error` (a row known
        to fail: an earlier stage's error)."""
        ids, errors = [], []
        for text in texts:
            try:
                if isinstance(text, GPT2Error):  # a row known to fail (an earlier stage's error)
                    raise text
                ids.append(text_ids(text, self.tokenizer, self.config))
                errors.append(None)
            except GPT2Error as e:
                if strict:
                    raise
                ids.append(None)
                errors.append(str(e))
        engine = self.engine(prefix_cache=prefix_cache)
        scored = iter(score_all(engine, [i for i in ids if i is not None], stride, max_batch))
        results = [next(scored) if e is None else TextScore([], error=e) for e in errors]
        failed = next((r.error for r in results if r.error), None)
        if strict and failed:
            raise GPT2Error(failed)
        return results


def _all_ints(ids) -> bool:
    try:
        return all(type(i) is int for i in ids)
    except TypeError:
        return False
