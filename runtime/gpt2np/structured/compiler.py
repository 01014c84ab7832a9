"""A `Constraint` as a checked llguidance grammar over GPT-2's vocabulary.

llguidance never raises for a bad grammar: its matcher enters an error state instead, and some
errors (a `$ref` cycle) show only at the first mask. So a constraint is compiled by building a
matcher and computing its first mask; any error then is the request's, as one line. Compiled
grammars (and refusals) are kept in a bounded cache keyed by the constraint's text, so a schema
sent with every request is compiled once.
"""

from __future__ import annotations

import json
import re
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import llguidance as llg
import llguidance.numpy as lln
import numpy as np
from llguidance.gbnf_to_lark import any_to_lark

from ..constraint import Constraint
from ..errors import GPT2Error
from ..tokenizer import GPT2_PATTERN, Tokenizer

CACHE_SIZE = 256  # compiled constraints kept (each holds a grammar's text; its lexer is per matcher)
# llguidance's own bounds on work per grammar and per mask (its defaults, stated here so that they
# are ours): a hostile schema, pattern or grammar is refused or fails within them, in milliseconds.
LIMITS = dict(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
              step_max_items=50_000, max_lexer_states=250_000, max_grammar_size=500_000, verbose_errors=False)
# Compact JSON by default (a schema may ask otherwise through `x-guidance`); never `lenient` (it
# would drop keywords it does not implement, so an output could fail its schema) nor
# `coerce_one_of` (anyOf in place of oneOf could match two branches).
JSON_DEFAULTS = {"whitespace_flexible": False}
JSON_OVERRIDES = {"lenient": False, "coerce_one_of": False}


def limits() -> llg.LLParserLimits:
    return llg.LLParserLimits(**LIMITS)


@dataclass
class CompileStats:
    """Totals since start: compiles run, their seconds, and cache hits."""
    compiled: int = 0
    seconds: float = 0.0
    hits: int = 0


stats = CompileStats()
_lock = threading.Lock()
_cache: OrderedDict[tuple, tuple[str | None, str | None]] = OrderedDict()  # key -> (grammar, error)
_ll_tokenizers: weakref.WeakKeyDictionary[Tokenizer, llg.LLTokenizer] = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer: Tokenizer) -> llg.LLTokenizer:
    """llguidance's view of our vocabulary (built once per tokenizer, in about 0.2 s): every
    token's bytes as its rank, GPT-2's pre-tokenizing pattern and <|endoftext|> as the end."""
    with _lock:
        lt = _ll_tokenizers.get(tokenizer)
    if lt is None:
        ranks = {b: i for i, b in tokenizer.token_bytes().items() if i not in tokenizer.special_tokens.values()}
        eos = tokenizer.special_tokens.get("<|endoftext|>")
        lt = llg.LLTokenizer.from_tiktoken(encoder=ranks, special_tokens=dict(tokenizer.special_tokens),
                                           pattern=GPT2_PATTERN, eos_token=eos)
        with _lock:
            lt = _ll_tokenizers.setdefault(tokenizer, lt)
    return lt


def grammar_text(c: Constraint) -> str:
    """llguidance's grammar for the constraint (not yet checked)."""
    try:
        if c.kind == "json_schema":
            return llg.LLMatcher.grammar_from_json_schema(c.text, defaults=JSON_DEFAULTS, overrides=JSON_OVERRIDES)
        if c.kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_DEFAULTS,
                                                          overrides=JSON_OVERRIDES)
        if c.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(c.text)
        if c.kind == "choice":  # JSON strings are Lark strings
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in c.choices))
        return llg.LLMatcher.grammar_from_lark(any_to_lark(c.text))
    except Exception as e:  # noqa: BLE001 -- llguidance's converters raise ValueError and more
        raise GPT2Error(_message(c, str(e)), "constraint") from None


def _message(c: Constraint, error: str) -> str:
    """llguidance's error as one line, named by the constraint's kind."""
    what = {"json_schema": "the JSON schema", "json_object": "the JSON object constraint",
            "regex": "the regular expression", "choice": "the choice", "grammar": "the grammar"}[c.kind]
    line = re.sub(r"\s+\d+ \| .*$", "", " ".join(error.split()))  # not the excerpt of our own wrapping
    if len(line) > 300:
        line = line[:297] + "..."
    return f"{what} cannot be used: {line}"


def compile_constraint(c: Constraint, tokenizer: Tokenizer) -> str:
    """The checked grammar for `c` (from the cache when it was compiled before); `GPT2Error` naming
    the field "constraint" if llguidance refuses it."""
    key = (id(tokenizer), c.key)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            stats.hits += 1
    if hit is None:
        started = time.perf_counter()
        try:
            hit = (_check(c, grammar_text(c), tokenizer), None)
        except GPT2Error as e:
            hit = (None, str(e))
        with _lock:
            stats.compiled += 1
            stats.seconds += time.perf_counter() - started
            _cache[key] = hit
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    grammar, error = hit
    if error is not None:
        raise GPT2Error(error, "constraint")
    return grammar


def _check(c: Constraint, grammar: str, tokenizer: Tokenizer) -> str:
    lt = ll_tokenizer(tokenizer)
    matcher = llg.LLMatcher(lt, grammar, log_level=0, limits=limits())
    if not matcher.is_error():
        mask = lln.allocate_token_bitmask(1, lt.vocab_size)
        lln.fill_next_token_bitmask(matcher, mask)
        if not matcher.is_error() and not mask.any():
            raise GPT2Error(_message(c, "it allows no output"), "constraint")
    if matcher.is_error():
        error = matcher.get_error()
        if "NoExtension" in error:  # the state dump of a grammar that cannot start (a $ref cycle)
            error = "it allows no output (a reference that never ends?)"
        raise GPT2Error(_message(c, error), "constraint")
    return grammar


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def unpack(bitmask: np.ndarray, n_vocab: int) -> np.ndarray:
    """llguidance's bitmasks [N, words] (bit i of word w: token 32w + i) as booleans [N, n_vocab]."""
    bits = np.unpackbits(bitmask.view(np.uint8), axis=-1, bitorder="little").view(bool)
    if bits.shape[-1] < n_vocab:
        bits = np.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, n_vocab - bits.shape[-1])])
    return bits[..., :n_vocab]
