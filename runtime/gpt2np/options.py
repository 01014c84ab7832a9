"""Generation options: every option of a generation, its default, its rule and its help, defined
once for every front door (the API's keywords, the command lines' flags, the server's fields)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, Callable, Mapping

from .constraint import Constraint
from .errors import GPT2Error
from .sampling import Sampling

MAX_TOP_LOGPROBS = 20


def _whole(low: int, high: int | None = None) -> Callable[[str, Any], None]:
    def check(name: str, v: Any) -> None:
        if type(v) is not int or v < low or (high is not None and v > high):
            span = f">= {low}" if high is None else f"from {low} to {high}"
            raise GPT2Error(f"{name} must be a whole number {span}, got {v!r}", name)
    return check


def _number(low: float, high: float) -> Callable[[str, Any], None]:
    def check(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
            raise GPT2Error(f"{name} must be a number from {low:g} to {high:g}, got {v!r}", name)
    return check


def _sampling_field(name: str, v: Any) -> None:
    try:
        Sampling(**{name: v})  # Sampling owns these rules and their messages
    except GPT2Error as e:
        raise GPT2Error(str(e), name) from None


def _stops(name: str, v: Any) -> None:
    if not all(isinstance(s, str) and s for s in v):
        raise GPT2Error("stop strings must be non-empty strings", name)


def _bias(name: str, v: Any) -> None:
    for token, bias in v:
        if type(token) is not int or token < 0:
            raise GPT2Error(f"logit_bias keys must be token ids, got {token!r}", name)
        try:
            _number(-100, 100)(f"the logit bias of token {token}", bias)
        except GPT2Error as e:
            raise GPT2Error(str(e), name) from None


def _token_id(key: Any) -> int:
    """A logit_bias key: a token id (any integer type), or its decimal digits as text (JSON object
    keys are text)."""
    if isinstance(key, str):
        if key.isascii() and key.isdigit():
            return int(key)
    elif not isinstance(key, bool):
        try:
            return operator.index(key)
        except TypeError:
            pass
    raise GPT2Error(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")


def _constraint(name: str, v: Any) -> None:
    if v is not None and not isinstance(v, Constraint):
        raise GPT2Error(f"{name} must be a Constraint (or a dict such as {{'regex': ...}}), got {type(v).__name__}",
                        name)


def _flag(name: str, v: Any) -> None:
    if type(v) is not bool:
        raise GPT2Error(f"{name} must be true or false, got {v!r}", name)


def option(default: Any, help: str, check: Callable[[str, Any], None], cli: dict | None = None) -> Any:
    """A field of `Options`: its default, what it means (`help`, the API's wording), its rule, and
    (`cli`) how command lines spell it: `flag` (default `--name-with-dashes`), `type`, `metavar`,
    `multiple`, `is_flag`, `invert`, and the flag's own `help` where its wording differs."""
    return field(default=default, metadata={"help": help, "check": check, "cli": cli})


@dataclass(frozen=True)
class Options:
    """How to generate: the one definition of every generation option.

    The Python API takes these as keyword arguments, `gpt-run` and `gpt-batch` as flags (built from
    the `cli` entries below) and `gpt-serve` maps OpenAI's request fields onto them. Every value
    is checked here, once; an error names its field (`GPT2Error.field`).
    """

    n_tokens: int = option(50, "The most tokens to generate.", _whole(0),
                           {"flag": "-n/--n-tokens", "type": int, "show_default": True,
                            "help": "How many tokens to generate at most."})
    temperature: float | None = option(
        None, "Sampling temperature: the logits are divided by it. 0 is greedy; so is None, the default, "
              "unless top_k or top_p is given (then 1).", _sampling_field,
        {"type": float, "help": "Sample with this temperature (0 means greedy). Greedy is the default."})
    top_k: int | None = option(None, "Sample only from the K most likely tokens.", _sampling_field,
                               {"type": int, "metavar": "K"})
    top_p: float | None = option(
        None, "Sample only from the smallest set of most likely tokens whose probability reaches P.",
        _sampling_field, {"type": float, "metavar": "P"})
    seed: int | None = option(None, "Seed of the sampler's random stream: the same seed gives the same text.",
                              _sampling_field, {"type": int})
    stop: tuple[str, ...] = option(
        (), "Strings that end the generation when the text reaches one (it is not part of the text).", _stops,
        {"type": str, "multiple": True, "metavar": "TEXT",
         "help": "Stop when the text reaches TEXT, which is not printed. Repeat for several."})
    stop_at_eos: bool = option(True, "Stop at <|endoftext|> (which is never part of the text).", _flag,
                               {"flag": "--ignore-eos", "is_flag": True, "invert": True,
                                "help": "Keep generating after <|endoftext|>."})
    sliding_window: bool = option(
        False, "When the context is full, go on over its most recent half (recomputed) instead of stopping.",
        _flag, {"is_flag": True})
    presence_penalty: float = option(
        0.0, "Subtracted from the logit of every token generated so far (-2 to 2; OpenAI's).", _number(-2, 2),
        {"type": float, "metavar": "P", "help": "Subtract P from the logit of every token already generated (-2 to 2)."})
    frequency_penalty: float = option(
        0.0, "Times a token's count so far, subtracted from its logit (-2 to 2; OpenAI's).", _number(-2, 2),
        {"type": float, "metavar": "F", "help": "Subtract F times its count so far from each generated token's logit (-2 to 2)."})
    logit_bias: tuple[tuple[int, float], ...] = option(
        (), "Token id -> bias (-100 to 100) added to its logit before choosing (a dict, or (id, bias) pairs).", _bias,
        {"type": str, "multiple": True, "metavar": "ID=BIAS",
         "help": "Add BIAS (-100 to 100) to token ID's logit before choosing; repeat for several."})
    logprobs: int = option(0, "Record the N most likely tokens and their log-probabilities at each new "
                              f"token (0 to {MAX_TOP_LOGPROBS}; `Generation.top_logprobs`).",
                           _whole(0, MAX_TOP_LOGPROBS),
                           {"type": int, "metavar": "N", "help": "Record the N most likely tokens and their "
                            f"log-probabilities at each new token (0 to {MAX_TOP_LOGPROBS}; shown with --json)."})
    prompt_logprobs: int | None = option(
        None, "Score the prompt's tokens too, recording N alternatives at each (the first token has none).",
        lambda name, v: v is None or _whole(0, MAX_TOP_LOGPROBS)(name, v))

    constraint: Constraint | None = option(
        None, "What the output must be: a JSON schema, any JSON object, a regular expression, a choice among "
              "strings or a grammar (`Constraint`, or a dict such as `{'json': schema}`; needs gpt2np[structured]). "
              "Tokens it forbids get probability zero; the output ends when it is complete.", _constraint,
        {"constraint": True})
    fast_forward: bool = option(
        True, "With a constraint, append the tokens it forces (a key, a separator, the rest of the only choice "
              "left) without sampling them, several in one pass.", _flag,
        {"flag": "--no-fast-forward", "is_flag": True, "invert": True,
         "help": "With a constraint, sample the text it forces token by token instead of appending it."})

    def __post_init__(self) -> None:
        if isinstance(self.constraint, Mapping):
            object.__setattr__(self, "constraint", Constraint.parse(self.constraint))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if isinstance(self.logit_bias, Mapping):
            object.__setattr__(self, "logit_bias", tuple((_token_id(k), v) for k, v in self.logit_bias.items()))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "logit_bias", tuple(tuple(p) for p in self.logit_bias))
        for f in fields(self):
            self.check(f.name, getattr(self, f.name))
        if self.prompt_logprobs is not None and self.sliding_window:
            raise GPT2Error("prompt log-probabilities and the sliding window do not go together", "prompt_logprobs")

    @cached_property
    def sampling(self) -> Sampling:
        """The `Sampling` these options make: built once (the fields were checked already)."""
        return Sampling(self.temperature, self.top_k, self.top_p, self.seed)

    @classmethod
    def check(cls, name: str, value: Any) -> None:
        """Raise `GPT2Error` if `value` is not allowed for the option `name`."""
        cls.__dataclass_fields__[name].metadata["check"](name, value)

    @classmethod
    def table(cls) -> str:
        """Every option as a Markdown table (name, default, meaning): docs/api.md shows it, and a
        test keeps the page equal to it (`python -c "import gpt2np; print(gpt2np.Options.table())"`)."""
        rows = ["| option | default | meaning |", "| --- | --- | --- |"]
        for f in fields(cls):
            meaning = f.metadata["help"].replace("|", r"\|")
            rows.append(f"| `{f.name}` | `{f.default!r}` | {meaning} |")
        return "\n".join(rows)

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)
