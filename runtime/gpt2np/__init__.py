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
from .generate import check_ids, generate_greedy
from .model import KVCache, Params, forward
from .tokenizer import Tokenizer
from .weights import load_gpt2_weights

__all__ = ["GPT2", "GPT2Config", "GPT2Error", "Tokenizer", "load", "load_tokenizer"]
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


class GPT2:
    """A loaded GPT-2: its config, weights (`params`) and tokenizer."""

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

    def generate_ids(self, prompt: str | Sequence[int], n_tokens: int = 50, *,
                     stop_at_eos: bool = True) -> Iterator[int]:
        """Yield generated token ids (greedy), as each is chosen.

        `prompt` is text or token ids; an empty text prompt means unconditional generation
        (the context starts with `<|endoftext|>`). Stops after `n_tokens` or after `<|endoftext|>`.
        """
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if isinstance(prompt, str) and not ids:
            ids = [self.config.eos_token_id]
        return generate_greedy(self.params, self.config, ids, n_tokens, stop_at_eos=stop_at_eos)

    def generate(self, prompt: str | Sequence[int], n_tokens: int = 50, *,
                 stop_at_eos: bool = True) -> Iterator[str]:
        """Yield the generated text piece by piece; never splits a UTF-8 character.

        Same arguments as `generate_ids`. The pieces join to `decode(generated ids)`, less the
        final `<|endoftext|>` when generation stops there.
        """
        decoder = self.tokenizer.stream_decoder()
        for token in self.generate_ids(prompt, n_tokens, stop_at_eos=stop_at_eos):
            if stop_at_eos and token == self.config.eos_token_id:
                break
            piece = decoder.feed(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail
