"""gpt2np: OpenAI's GPT-2 in pure NumPy.

    >>> import gpt2np
    >>> model = gpt2np.load("models/124M")          # maps the weights; reads nothing yet
    >>> model.encode("Hello world")
    [15496, 995]
    >>> for piece in model.generate("The meaning of life is", n_tokens=20):
    ...     print(piece, end="", flush=True)

A model folder holds `config.json`, `model.safetensors`, `vocab.json` and `merges.txt` (the layout of
a Hugging Face GPT-2 folder; see README.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .config import GPT2Config
from .errors import GPT2Error
from .engine import Engine
from .generate import STOP_REASONS, Generation, Options, check_ids
from .generate import Sequence as GenerationSequence
from . import reference
from .model import KVCache, Params, forward
from .reference import Trace
from .sampling import Sampling
from .score import Score, score
from .tokenizer import Tokenizer
from .weights import load_gpt2_weights

__all__ = ["Engine", "GPT2", "GPT2Config", "GPT2Error", "Generation", "Options", "STOP_REASONS", "Sampling", "Score", "TextStream",
           "Tokenizer", "Trace", "load", "load_tokenizer"]
__version__ = "0.1.0"

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


def load(path: str | Path) -> "GPT2":
    """Load a model folder. The weights are memory-mapped, not read: this takes milliseconds."""
    path = Path(path)
    _check_folder(path)
    config = GPT2Config.from_file(path / "config.json")
    tokenizer = load_tokenizer(path)
    if tokenizer.n_vocab != config.vocab_size:
        raise GPT2Error(f"{path}: vocab.json has {tokenizer.n_vocab} tokens but config.json says "
                        f"vocab_size {config.vocab_size}")
    weights, metadata = load_gpt2_weights(path / "model.safetensors", config)
    return GPT2(config, Params.from_weights(weights, config), tokenizer, metadata)


class TextStream:
    """The text of one generation, piece by piece as it is produced; iterate over it.

    Pieces never split a UTF-8 character and never show part of a stop string. `result` is the
    `Generation` (ids, text, log-probabilities, stop reason, timings), complete after iteration.
    """

    def __init__(self, engine: Engine, sequences: list[GenerationSequence]):
        self._events = engine.events()
        self.result: Generation = sequences[0].result

    def __iter__(self) -> Iterator[str]:
        for seq, _, text in self._events:
            if text:
                yield text
            if seq.result.error is not None:
                raise GPT2Error(seq.result.error)


class GPT2:
    """A loaded GPT-2: its config, weights (`params`) and tokenizer.

    Generation methods take the fields of `gpt2np.Options` as keyword arguments (the one list
    of generation options, with their rules):

    - `n_tokens`: the most tokens to generate (default 50).
    - `temperature`, `top_k`, `top_p`, `seed`: sampling (see `gpt2np.sampling.Sampling`). Greedy by
      default; giving `top_k` or `top_p` alone samples at temperature 1; temperature 0 is greedy.
    - `stop`: strings that end generation when the text reaches one (the string is not included).
    - `stop_at_eos`: stop at `<|endoftext|>` (default True; it is never part of the text).
    - `sliding_window`: when the context (1024 positions) is full, recompute the cache over the
      most recent half and go on, instead of stopping with stop reason "context". A prompt longer
      than the context is an error, or with the sliding window keeps its most recent half.
    - `presence_penalty`, `frequency_penalty` (-2 to 2), `logit_bias` ({token id: -100 to 100}):
      OpenAI's adjustments of the logits before a token is chosen.
    - `logprobs=N`: also record the N most likely tokens at each step (`Generation.top_logprobs`);
      `prompt_logprobs=N`: score the prompt's own tokens (`Generation.prompt_logprobs`).
    """

    def __init__(self, config: GPT2Config, params: Params, tokenizer: Tokenizer,
                 metadata: dict[str, str] | None = None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.metadata = metadata or {}

    def encode(self, text: str, *, allowed_special: bool | Iterable[str] = False) -> list[int]:
        """Token ids of `text` (see `Tokenizer.encode`; `<|endoftext|>` is plain text by default)."""
        return self.tokenizer.encode(text, allowed_special=allowed_special)

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
        arr = check_ids(self.encode(ids) if isinstance(ids, str) else ids, self.config)
        if not 0 < len(arr) <= self.config.n_positions:
            raise GPT2Error(f"trace needs 1 to {self.config.n_positions} tokens, got {len(arr)}")
        return reference.trace(self.params, self.config, arr)

    def _ids(self, ids: Sequence[int]) -> list[int]:
        """Token ids given by the caller, checked against the vocabulary, as Python ints."""
        return [int(i) for i in check_ids(ids, self.config)]

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """Text is encoded (empty text means unconditional: `<|endoftext|>`); ids pass through."""
        if isinstance(prompt, str):
            return self.encode(prompt) or [self.config.eos_token_id]
        return self._ids(prompt)

    def options(self, n_tokens: int = 50, **options) -> Options:
        """The generation options (see `gpt2np.generate.Options`), checked."""
        return Options(n_tokens=n_tokens, **options)

    def engine(self, max_batch: int | None = None, prefill_chunk: int | None = None) -> Engine:
        """A decode loop over this model, for callers that add and step sequences themselves
        (a server, a pipeline stage). See `gpt2np.engine.Engine`."""
        return Engine(self.params, self.config, self.tokenizer, max_batch=max_batch, prefill_chunk=prefill_chunk)

    def queue(self, prompts: Sequence[str | Sequence[int]], n_tokens: int = 50, *, strict: bool = True,
              max_batch: int | None = None, **options) -> tuple[Engine, list[GenerationSequence]]:
        """A new engine holding `prompts`, not yet run, and their sequences in order.

        `strict`: a prompt that cannot run raises `GPT2Error` (nothing runs); otherwise it becomes
        a sequence that ends at once with an error, and the others run.
        """
        opts = self.options(n_tokens, **options)
        engine, seqs = self.engine(max_batch=max_batch), []
        for i, p in enumerate(prompts):
            try:
                seqs.append(engine.add(self._prompt_ids(p), opts, tag=i))
            except GPT2Error as e:
                if strict:
                    raise
                ids = [] if isinstance(p, str) or not _all_ints(p) else list(p)
                seqs.append(engine.add_failed(ids, opts, str(e), tag=i))
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
        return (token for _, token, _ in engine.events() if token is not None)

    def complete(self, prompt: str | Sequence[int], n_tokens: int = 50, **options) -> Generation:
        """Generate to the end and return the `Generation`."""
        engine, (seq,) = self.queue([prompt], n_tokens, **options)
        engine.run()
        if seq.result.error is not None:
            raise GPT2Error(seq.result.error)
        return seq.result

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], n_tokens: int = 50, *,
                       max_batch: int | None = None, **options) -> list[Generation]:
        """Generate for several prompts at once, in one forward pass per step; results in order.

        Each prompt has its own length, cache, stop rules and random stream (a `seed` gives every
        prompt the stream it would have alone), so each result equals what `complete` gives. A
        prompt that cannot run (too long, bad ids) gets a result with `error` set and stop reason
        "error"; the others run. `max_batch` caps the prompts in one pass (the rest join as others
        finish); by default all run together. Bad options raise `GPT2Error`.
        """
        engine, seqs = self.queue(prompts, n_tokens, strict=False, max_batch=max_batch, **options)
        engine.run()
        return [s.result for s in seqs]

    def score(self, text: str | Sequence[int], *, stride: int | None = None) -> Score:
        """Per-token log-probabilities, NLL and perplexity of `text` (see `gpt2np.score`)."""
        ids = self.encode(text) if isinstance(text, str) else self._ids(text)
        return score(self.params, self.config, ids, stride)


def _all_ints(ids) -> bool:
    try:
        return all(type(i) is int for i in ids)
    except TypeError:
        return False
