"""Prompts: the one rule that turns a prompt (text or token ids) into checked token ids, and the
one reader of a JSON-lines input row. Every front door calls these."""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from .config import GPT2Config
from .errors import GPT2Error
from .tokenizer import Tokenizer


def check_ids(ids: Sequence[int], config: GPT2Config) -> np.ndarray:
    """Token ids as an int64 array, each checked to be in the vocabulary."""
    try:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    except OverflowError:  # an integer past int64 is outside the vocabulary, not a non-integer
        bad = next((i for i in ids if isinstance(i, int) and not -2**63 <= i < 2**63), None)
        if bad is None:
            raise GPT2Error("token ids must be integers", "prompt") from None
        raise GPT2Error(f"token id {bad} is outside the vocabulary (0..{config.vocab_size - 1})", "prompt") from None
    except (TypeError, ValueError):
        raise GPT2Error("token ids must be integers", "prompt") from None
    if arr.size and not (0 <= arr.min() and arr.max() < config.vocab_size):
        bad = next(int(i) for i in arr if not 0 <= i < config.vocab_size)
        raise GPT2Error(f"token id {bad} is outside the vocabulary (0..{config.vocab_size - 1})", "prompt")
    return arr


def text_ids(text: str | Sequence[int], tokenizer: Tokenizer, config: GPT2Config, *,
             special: bool = False, limit: int | None = None) -> list[int]:
    """Text encoded, or token ids checked against the vocabulary; anything else is an error.
    `special`: `<|endoftext|>` written in the text is the special token (as OpenAI's and vLLM's
    servers read it) rather than plain text (the API's default). `limit`: text that needs more
    tokens raises `TokenLimitError`, as soon as that is known (see `Tokenizer.encode`)."""
    if isinstance(text, str):
        return tokenizer.encode(text, allowed_special=special, limit=limit)
    if isinstance(text, (list, tuple, range, np.ndarray)):
        return [int(i) for i in check_ids(text, config)]
    raise GPT2Error(f"a prompt must be a string or a list of token ids, not {type(text).__name__}", "prompt")


def prompt_ids(prompt: str | Sequence[int], tokenizer: Tokenizer, config: GPT2Config, *,
               special: bool = False, limit: int | None = None) -> list[int]:
    """A prompt's token ids (`text_ids`), where empty text means unconditional generation: it
    starts from `<|endoftext|>`."""
    ids = text_ids(prompt, tokenizer, config, special=special, limit=limit)
    return (ids or [config.eos_token_id]) if isinstance(prompt, str) else ids


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_jsonl_line(line: bytes | str, field: str) -> dict[str, Any]:
    """One row of a JSON-lines input: a JSON object, or a bare JSON string, which stands for
    `{field: string}` (`field`: "prompt", "text"). `GPT2Error` saying what is wrong otherwise
    (not UTF-8, not JSON, NaN, neither an object nor a string). `row_text` then takes the field."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GPT2Error(f"not UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(line, parse_constant=_reject_constant)
    except ValueError as e:
        raise GPT2Error(f"not JSON ({e})") from None
    if isinstance(obj, str):
        return {field: obj}
    if not isinstance(obj, dict):
        raise GPT2Error("not a JSON object")
    return obj


def row_text(row: dict[str, Any], field: str) -> str:
    """The row's `field`, which must be a string (`GPT2Error` if missing or not)."""
    value = row.get(field)
    if not isinstance(value, str):
        raise GPT2Error(f'no "{field}" string' if value is None else
                        f'"{field}" must be a string, not {type(value).__name__}')
    return value
