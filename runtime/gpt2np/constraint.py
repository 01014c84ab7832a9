"""Constraints on the output (structured outputs): what a generation must produce, as data.

A `Constraint` names one of five kinds: a JSON Schema, any JSON object, a regular expression
(the whole output matches it), a choice among strings, or a context-free grammar (Lark or
llama.cpp's GBNF). The core's rule, applied by `SequenceState` at every step: tokens the
constraint forbids get probability zero; temperature, top-k, top-p, the penalties and the logit
bias act on the tokens left, renormalised; the end of text is allowed exactly when the output so
far is complete, and a complete output that cannot go on ends the generation ("stop").

This module is data only and needs no library: the token masks come from the extra
`gpt2np[structured]` (`gpt2np.structured`, built on llguidance), imported when a generation
with a constraint starts. Without it, asking for a constraint is the one-line missing-extra error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import GPT2Error, missing_extra

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_TEXT = 128 * 1024  # characters of a schema, pattern, grammar or all choices together
DICT_KEYS = {"json": "json_schema", "json_schema": "json_schema", "json_object": "json_object",
             "regex": "regex", "choice": "choice", "grammar": "grammar"}
"""The keys of a constraint as a dict (vLLM's `structured_outputs` spelling, and our kinds' names)."""


@dataclass(frozen=True)
class Constraint:
    """What the output must be. Build one with a class method:

    - `Constraint.json_schema(schema)`: JSON that validates against `schema` (a dict, or its JSON text);
    - `Constraint.json_object()`: any JSON object;
    - `Constraint.regex(pattern)`: text that the pattern (Rust `regex` syntax, close to Python's
      `re`) matches as a whole;
    - `Constraint.choice(["yes", "no"])`: exactly one of the strings;
    - `Constraint.grammar(text)`: text the grammar derives, in Lark syntax or llama.cpp's GBNF
      (told apart by the text itself: GBNF rules are written `name ::= ...`).

    Or `Constraint.parse(d)` with a dict of one key: `json` (or `json_schema`), `json_object`,
    `regex`, `choice` or `grammar` (vLLM's `structured_outputs`). JSON comes out compact (no
    whitespace between tokens) unless the schema asks otherwise with llguidance's `x-guidance`
    keyword, e.g. `{"x-guidance": {"item_separator": ", ", "key_separator": ": "}}`.
    """

    kind: str
    text: str = ""  # the schema's JSON text, the pattern or the grammar
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GPT2Error(f"a constraint's kind is one of {', '.join(KINDS)}, got {self.kind!r}", "constraint")
        if len(self.text) + sum(map(len, self.choices)) > MAX_TEXT:
            raise GPT2Error(f"the constraint is longer than {MAX_TEXT} characters", "constraint")

    @classmethod
    def json_schema(cls, schema: Mapping | str) -> "Constraint":
        if isinstance(schema, str):
            try:
                parsed = json.loads(schema)
            except ValueError as e:
                raise GPT2Error(f"the JSON schema is not valid JSON ({e})", "constraint") from None
        else:
            parsed = schema
        if not isinstance(parsed, Mapping):
            raise GPT2Error(f"a JSON schema must be a JSON object, got {type(parsed).__name__}", "constraint")
        try:
            text = schema if isinstance(schema, str) else json.dumps(schema, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise GPT2Error(f"the JSON schema cannot be written as JSON ({e})", "constraint") from None
        return cls("json_schema", text)

    @classmethod
    def json_object(cls) -> "Constraint":
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        if not isinstance(pattern, str) or not pattern:
            raise GPT2Error(f"a regular expression must be a non-empty string, got {pattern!r}", "constraint")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices) -> "Constraint":
        if isinstance(choices, str) or not all(isinstance(c, str) for c in choices):
            raise GPT2Error("choice takes a list of strings", "constraint")
        choices = tuple(dict.fromkeys(choices))  # the same string twice is one choice
        if not choices or not all(choices):
            raise GPT2Error("choice needs at least one string, and no empty one", "constraint")
        return cls("choice", choices=choices)

    @classmethod
    def grammar(cls, text: str) -> "Constraint":
        if not isinstance(text, str) or not text.strip():
            raise GPT2Error("a grammar must be a non-empty string (Lark or GBNF)", "constraint")
        return cls("grammar", text)

    @classmethod
    def parse(cls, value: Any) -> "Constraint":
        """A constraint from a `Constraint`, or a dict of one key (see the class)."""
        if isinstance(value, Constraint):
            return value
        if not isinstance(value, Mapping):
            raise GPT2Error(f"a constraint is a Constraint or a dict with one of the keys {', '.join(DICT_KEYS)}, "
                            f"got {type(value).__name__}", "constraint")
        given = [k for k, v in value.items() if v is not None and v is not False]
        unknown = [k for k in given if k not in DICT_KEYS]
        if unknown:
            raise GPT2Error(f"unknown constraint {unknown[0]!r} (one of {', '.join(DICT_KEYS)})", "constraint")
        if len(given) != 1:
            raise GPT2Error("give exactly one constraint" + (f", not {len(given)}: {', '.join(given)}" if given else ""),
                            "constraint")
        kind, v = DICT_KEYS[given[0]], value[given[0]]
        if kind == "json_object":
            if v is not True:
                raise GPT2Error(f"json_object takes true, got {v!r}", "constraint")
            return cls.json_object()
        return getattr(cls, kind)(v)

    def as_dict(self) -> dict:
        """The dict form (`parse`'s input): `{"json": schema}`, `{"regex": pattern}`, ..."""
        if self.kind == "json_schema":
            return {"json": json.loads(self.text)}
        if self.kind == "json_object":
            return {"json_object": True}
        return {"choice": list(self.choices)} if self.kind == "choice" else {self.kind: self.text}

    @property
    def key(self) -> tuple:
        """What identifies the compiled constraint (the compile cache's key)."""
        return self.kind, self.text, self.choices

    def describe(self) -> str:
        """A short description for logs and errors."""
        if self.kind == "choice":
            return f"choice among {len(self.choices)}"
        return self.kind + (f" ({len(self.text)} characters)" if self.text else "")


def backend():
    """The structured-outputs extra (`gpt2np.structured`), or the missing-extra error."""
    try:
        from . import structured
    except ImportError as e:
        raise missing_extra("a constraint", "structured", e) from None
    return structured


def fill_masks(guides: list) -> None:
    """Set the next-token mask of each guide (`gpt2np.structured.Guide`) of a batch, together."""
    backend().fill_masks(guides)
