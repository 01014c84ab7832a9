"""The wire protocol of `gpt-serve`: OpenAI's legacy completions API as vLLM serves it.

Request schemas are strict (wrong types and unknown fields are errors, not guesses); responses are
plain dicts built by the functions at the end. Every error leaves the server as `ErrorResponse`:
`{"error": {"message", "type", "param", "code"}}`, with the HTTP status of `APIError.status`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from ..constraint import MAX_TEXT as MAX_CONSTRAINT
from ..constraint import Constraint
from ..errors import GPT2Error
from ..options import Options

MAX_STOP = 4  # OpenAI's limit and vLLM's default; `gpt-serve --max-stop-strings` changes it
MAX_STOP_CHARS = 1000
MAX_N = 128
MAX_LOGPROBS = 5
MAX_LOGIT_BIAS = 300  # entries, OpenAI's limit
MAX_TOKENIZE = 65536  # tokens /tokenize encodes at most (64 contexts of 1024)


class APIError(Exception):
    """An error to send as OpenAI sends them."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _integer_valued(v: Any) -> Any:
    """4.0 is the integer 4, as JSON Schema, vLLM and OpenAI's clients have it (4.5 stays an error);
    in lists (of lists) of token ids too. Strings and the rest are left to the field's type."""
    if type(v) is float and v.is_integer():
        return int(v)
    if type(v) is list:
        return [_integer_valued(x) for x in v]
    return v


# JSON has one number type: an integer-valued number is an integer (`_integer_valued`, applied as
# a field validator so that the bounds stay visible in the JSON schema), any integer a number.
Integer = StrictInt
Number = float  # strict: an int or a float, never a bool or a string
TokenIds = Annotated[list[Integer], Field(min_length=1)]
StopString = Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)]
ConstraintText = Annotated[StrictStr, Field(min_length=1, max_length=MAX_CONSTRAINT)]


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class JsonSchemaFormat(_Strict):
    """OpenAI's `response_format.json_schema`: the schema and its name (`strict` is accepted;
    the schema is always enforced)."""

    name: Optional[StrictStr] = None
    description: Optional[StrictStr] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[StrictBool] = None


class ResponseFormat(_Strict):
    """OpenAI's `response_format`: `text` (no constraint), `json_object` or `json_schema`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs`: exactly one of `json` (a schema), `regex`, `choice`, `grammar`
    (Lark or GBNF) or `json_object`."""

    json_: Optional[Union[dict[str, Any], ConstraintText]] = Field(None, alias="json")
    regex: Optional[ConstraintText] = None
    choice: Optional[Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1)]] = None
    grammar: Optional[ConstraintText] = None
    json_object: Optional[StrictBool] = None


CONSTRAINT_FIELDS = ("response_format", "structured_outputs", "json_schema", "grammar")
"""The request fields that carry a constraint: OpenAI's, vLLM's and llama.cpp's spellings."""


class CompletionRequest(_Strict):
    """POST /v1/completions. `top_k` and `ignore_eos` are vLLM's extensions; so are
    `structured_outputs` and `return_tokens_as_token_ids`; `json_schema` and `grammar` (GBNF) are
    llama.cpp's server's; `fast_forward` is gpt2np's."""

    model: StrictStr
    prompt: Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1)]]
    # Values are checked again by `gpt2np.Options` (the one rule of every door); the bounds here are
    # OpenAI's own, so that the served schema states them.
    max_tokens: Optional[Annotated[Integer, Field(ge=0)]] = 16
    temperature: Optional[Annotated[Number, Field(ge=0, le=2)]] = None
    top_p: Optional[Annotated[Number, Field(gt=0, le=1)]] = None
    top_k: Optional[Annotated[Integer, Field(ge=-1)]] = None  # -1 and 0: all tokens
    n: Annotated[Integer, Field(ge=1, le=MAX_N)] = 1
    best_of: Optional[Integer] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[Annotated[Integer, Field(ge=0, le=MAX_LOGPROBS)]] = None
    echo: StrictBool = False
    stop: Optional[Union[StopString, list[StopString]]] = None  # how many: the server's --max-stop-strings
    seed: Optional[Integer] = None  # any integer (OpenAI's is int64): the sampler takes it modulo 2^63
    presence_penalty: Optional[Annotated[Number, Field(ge=-2, le=2)]] = 0.0
    frequency_penalty: Optional[Annotated[Number, Field(ge=-2, le=2)]] = 0.0
    logit_bias: Optional[Annotated[dict[Annotated[StrictStr, Field(pattern=r"^[0-9]+$")],
                                        Annotated[Number, Field(ge=-100, le=100)]],
                                   Field(max_length=MAX_LOGIT_BIAS)]] = None
    user: Optional[StrictStr] = None
    suffix: Optional[StrictStr] = None
    ignore_eos: StrictBool = False
    cache_salt: Optional[StrictStr] = None  # vLLM's: requests with different salts never share cached prefixes
    return_tokens_as_token_ids: StrictBool = False  # vLLM's: logprobs name tokens `token_id:N`, not by text
    # Constraints on the output (at most one of these): OpenAI's, vLLM's and llama.cpp's spellings.
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = None
    json_schema: Optional[dict[str, Any]] = None
    grammar: Optional[ConstraintText] = None
    fast_forward: StrictBool = True  # append the text a constraint forces without sampling it

    _integers = field_validator("prompt", "max_tokens", "top_k", "n", "best_of", "logprobs", "seed",
                                mode="before")(_integer_valued)

    # OpenAI's defaults: the field defaults above, and how an absent or neutral value maps onto
    # the core's options (which default to greedy and no filtering) -- here and nowhere else.
    def max_tokens_for(self, prompt_len: int, context: int) -> int:
        """`max_tokens`; null means the rest of the context."""
        return max(context - prompt_len, 0) if self.max_tokens is None else self.max_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def constraint_fields(self) -> list[str]:
        """The fields of this request that ask for a constraint (`response_format` of type text does not)."""
        given = [f for f in CONSTRAINT_FIELDS if getattr(self, f) is not None]
        return [f for f in given if f != "response_format" or self.response_format.type != "text"]

    def constraint(self) -> Constraint | None:
        """The request's constraint (with at most one of `constraint_fields`), or None. `GPT2Error`
        (field "constraint") if its value is not one."""
        fields = self.constraint_fields
        if not fields:
            return None
        f = fields[0]
        if f == "response_format":
            rf = self.response_format
            if rf.type == "json_object":
                return Constraint.json_object()
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise GPT2Error("response_format of type json_schema needs json_schema.schema", "constraint")
            return Constraint.json_schema(rf.json_schema.schema_)
        if f == "structured_outputs":
            so = self.structured_outputs
            return Constraint.parse({"json": so.json_, "regex": so.regex, "choice": so.choice,
                                     "grammar": so.grammar, "json_object": so.json_object or None})
        return Constraint.json_schema(self.json_schema) if f == "json_schema" else Constraint.grammar(self.grammar)

    def to_options(self, prompt_len: int, sample: int, context: int) -> Options:
        """The core's options for sample `sample` (of `n`) of a prompt of `prompt_len` tokens:
        temperature 1 when absent, `top_p` 1 and `top_k` <= 0 mean no filter, sample j seeded
        with seed + j (any integer, modulo 2^63), `logprobs` with `echo` scores the prompt too.
        `GPT2Error` (naming the core's field) if the core refuses a value."""
        return Options(
            n_tokens=self.max_tokens_for(prompt_len, context),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=None if self.top_p in (None, 1) else self.top_p,
            top_k=None if self.top_k is None or self.top_k <= 0 else self.top_k,
            seed=None if self.seed is None else (self.seed + sample) % 2**63,
            stop=self.stop_strings, stop_at_eos=not self.ignore_eos,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.logit_bias or {}, logprobs=self.logprobs or 0,
            prompt_logprobs=self.logprobs if self.echo and self.logprobs is not None else None,
            constraint=self.constraint(), fast_forward=self.fast_forward)


MAX_EXPLAIN_CHARS = 20_000  # more text than the explain report's positions could ever hold


class ExplainRequest(_Strict):
    """POST /ui/api/explain (the playground's): gpt-explain's page for `prompt`."""

    prompt: Annotated[StrictStr, Field(max_length=MAX_EXPLAIN_CHARS)]
    model: Optional[StrictStr] = None


class _Lenient(BaseModel):
    """vLLM's tokenizer endpoints ignore fields they do not know (newer clients send more)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TokenizeRequest(_Lenient):
    """POST /tokenize, as vLLM takes it. `add_special_tokens` is accepted for vLLM's clients (GPT-2
    adds none either way); `return_token_strs` adds each token's vocabulary string. vLLM's chat
    form (`messages` and its options) is recognised so that it gets a clear 400: GPT-2 has no chat
    template."""

    prompt: Optional[StrictStr] = None
    model: Optional[StrictStr] = None
    add_special_tokens: StrictBool = True
    return_token_strs: Optional[StrictBool] = False
    messages: Optional[list[Any]] = None
    add_generation_prompt: Optional[StrictBool] = None
    continue_final_message: Optional[StrictBool] = None
    chat_template: Optional[StrictStr] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None


class DetokenizeRequest(_Lenient):
    """POST /detokenize (vLLM's)."""

    tokens: list[Integer]
    model: Optional[StrictStr] = None

    _integers = field_validator("tokens", mode="before")(_integer_valued)


FinishReason = Literal["stop", "length"]

FINISH_REASONS: dict[str, FinishReason] = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}
"""The engine's stop reasons as OpenAI names them."""


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion(id: str, created: int, model: str, choices: list[dict], usage: dict | None) -> dict:
    body = {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def choice(index: int, text: str, logprobs: dict | None, finish_reason: FinishReason | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def logprobs(tokens: list[str], token_logprobs: list[float | None], top_logprobs: list[dict[str, float] | None],
             text_offset: list[int]) -> dict:
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def model_card(name: str, created: int, max_model_len: int, weights: str = "float32") -> dict:
    """vLLM's model card: `max_model_len` tells clients the context, and `permission` has vLLM's
    fields and values; gpt2np adds `weights`, the precision of the weights in the products."""
    permission = {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": created,
                  "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                  "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                  "organization": "*", "group": None, "is_blocking": False}
    return {"id": name, "object": "model", "created": created, "owned_by": "gpt2np", "root": name, "parent": None,
            "max_model_len": max_model_len, "weights": weights, "permission": [permission]}


def tokenizer_info(tokenizer, eos_token_id: int, max_model_len: int) -> dict:
    """GET /tokenizer_info, as vLLM answers it for Hugging Face's GPT-2 tokenizer: the tokenizer's
    class and its configuration (no `chat_template`: GPT-2 has none)."""
    eos = tokenizer.id_to_token.get(eos_token_id)
    return {"tokenizer_class": "GPT2TokenizerFast", "add_bos_token": False, "add_prefix_space": False,
            "bos_token": eos, "eos_token": eos, "unk_token": eos, "pad_token": None,
            "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": max_model_len,
            "added_tokens_decoder": {str(i): s for s, i in tokenizer.special_tokens.items()}}


def tokenize_response(tokens: list[int], max_model_len: int, token_strs: list[str] | None) -> dict:
    return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens, "token_strs": token_strs}


def models(cards: list[dict]) -> dict:
    return {"object": "list", "data": cards}


def now() -> int:
    return int(time.time())


EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids (none empty)",
    "stop": f"a string or a list of strings, each at most {MAX_STOP_CHARS} characters",
    "temperature": "a number", "top_p": "a number", "presence_penalty": "a number", "frequency_penalty": "a number",
    "logit_bias": f"an object mapping token ids to numbers from -100 to 100, at most {MAX_LOGIT_BIAS} entries",
}


_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
           "less_than": ("<", "lt")}


def describe_validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for pydantic's errors about a request body: the first field's, readably.

    A union (prompt, stop, numbers) reports one error per alternative; when each alternative
    only failed on its type, the message says what the field may be."""
    if not errors:
        return "the request is not valid", None

    def param_of(e) -> str | None:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        top = loc[:1]  # the field; deeper parts name union alternatives or list positions
        return top[0] if top else None

    first = errors[0]
    param = param_of(first)
    kind = first.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if kind == "extra_forbidden":
        return f"unknown field {param!r}: this server does not support it", param
    if kind == "missing":
        return (f"{param} is required", param) if param else ("the body must be a JSON object", None)
    if param is None:
        return "the body must be a JSON object", None
    same = [e for e in errors if param_of(e) == param]
    specific = [e for e in same if not e.get("type", "").endswith("_type")]
    if param == "logit_bias":  # a key that is not a token id, a bias out of range, too many entries
        return f"logit_bias must be {EXPECTED[param]}", param
    if len(same) > 1 and not specific or param in EXPECTED and not specific:
        return f"{param} must be {EXPECTED.get(param, 'of another type')}", param
    e = (specific or same)[0]
    bound = _BOUNDS.get(e.get("type", ""))
    if bound is not None and len(e.get("loc", ())) <= 2:  # the field itself out of its range
        op, key = bound
        return f"{param} must be {op} {e.get('ctx', {}).get(key)}, got {e.get('input')!r}", param
    where = ".".join(str(p) for p in e.get("loc", ())[1:] if p != "body" and not str(p)[:1].isalpha()
                     or str(p) == param)
    return f"{where or param}: {e.get('msg', 'invalid value')}", param
