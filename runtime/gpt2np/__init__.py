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
from .generate import STOP_REASONS, Decoder, Generation, Options, check_ids
from .model import KVCache, Params, forward
from .sampling import Sampling
from .score import Score, score
from .tokenizer import Tokenizer
from .weights import load_gpt2_weights

__all__ = ["GPT2", "GPT2Config", "GPT2Error", "Generation", "STOP_REASONS", "Sampling", "Score", "TextStream",
           "Tokenizer", "load", "load_tokenizer"]
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

    def __init__(self, decoder: Decoder):
        self._events = decoder.events()
        self.result: Generation = decoder.results[0]

    def __iter__(self) -> Iterator[str]:
        for _, _, text in self._events:
            if text:
                yield text


class GPT2:
    """A loaded GPT-2: its config, weights (`params`) and tokenizer.

    Generation methods share these keyword arguments:

    - `n_tokens`: the most tokens to generate (default 50).
    - `temperature`, `top_k`, `top_p`, `seed`: sampling (see `gpt2np.sampling.Sampling`). Greedy by
      default; giving `top_k` or `top_p` alone samples at temperature 1; temperature 0 is greedy.
    - `stop`: strings that end generation when the text reaches one (the string is not included).
    - `stop_at_eos`: stop at `<|endoftext|>` (default True; it is never part of the text).
    - `sliding_window`: when the context (1024 positions) is full, recompute the cache over the
      most recent half and go on, instead of stopping with stop reason "context". A prompt longer
      than the context is an error, or with the sliding window keeps its most recent half.
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

    def _ids(self, ids: Sequence[int]) -> list[int]:
        """Token ids given by the caller, checked against the vocabulary, as Python ints."""
        return [int(i) for i in check_ids(ids, self.config)]

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """Text is encoded (empty text means unconditional: `<|endoftext|>`); ids pass through."""
        if isinstance(prompt, str):
            return self.encode(prompt) or [self.config.eos_token_id]
        return self._ids(prompt)

    def _decoder(self, prompts, n_tokens, temperature=None, top_k=None, top_p=None, seed=None, stop=(),
                 stop_at_eos=True, sliding_window=False) -> Decoder:
        if isinstance(stop, str):
            stop = (stop,)
        options = Options(n_tokens=n_tokens, sampling=Sampling(temperature, top_k, top_p, seed),
                          stop=tuple(stop), stop_at_eos=stop_at_eos, sliding_window=sliding_window)
        return Decoder(self.params, self.config, self.tokenizer, [self._prompt_ids(p) for p in prompts], options)

    def generate(self, prompt: str | Sequence[int], n_tokens: int = 50, **options) -> TextStream:
        """Stream the continuation of `prompt` (text or token ids) as text pieces.

        Everything is checked when called; the work happens as you iterate. See the class
        docstring for the options. The pieces join to `result.text`.
        """
        return TextStream(self._decoder([prompt], n_tokens, **options))

    def generate_ids(self, prompt: str | Sequence[int], n_tokens: int = 50, **options) -> Iterator[int]:
        """Yield the generated token ids as each is chosen (including a final `<|endoftext|>`)."""
        return (token for _, token, _ in self._decoder([prompt], n_tokens, **options).events())

    def complete(self, prompt: str | Sequence[int], n_tokens: int = 50, **options) -> Generation:
        """Generate to the end and return the `Generation`."""
        return self.generate_batch([prompt], n_tokens, **options)[0]

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], n_tokens: int = 50,
                       **options) -> list[Generation]:
        """Generate for several prompts at once, in one forward pass per step; results in order.

        Each prompt has its own length, cache, stop rules and random stream (a `seed` gives every
        prompt the stream it would have alone), so each result equals what `complete` gives.
        """
        decoder = self._decoder(prompts, n_tokens, **options)
        for _ in decoder.events():
            pass
        return decoder.results

    def score(self, text: str | Sequence[int], *, stride: int | None = None) -> Score:
        """Per-token log-probabilities, NLL and perplexity of `text` (see `gpt2np.score`)."""
        ids = self.encode(text) if isinstance(text, str) else self._ids(text)
        return score(self.params, self.config, ids, stride)
