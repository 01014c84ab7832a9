"""Structured outputs in the core: every finished output satisfies its constraint, checked by
libraries that did not make it (`jsonschema`, Python's `re`, `lark`); greedy and sampled choices
follow the renormalised distribution over the allowed tokens (computed here by brute force over
the vocabulary); fast-forwarded tokens are canonical; batches, streams and bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import jsonschema
import lark
import numpy as np
import pytest

import gpt2np
from conftest import SMALL_HPARAMS, write_model_dir
from gpt2np import Constraint, GPT2Error
from helpers.make_checkpoint import random_openai_weights

HP = {**SMALL_HPARAMS, "n_ctx": 256}  # room for whole JSON objects


@pytest.fixture(scope="module")
def m(tmp_path_factory):
    folder = write_model_dir(tmp_path_factory.mktemp("s256") / "model", HP, random_openai_weights(HP, seed=3))
    return gpt2np.load(folder)


SCHEMAS = {
    "object": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 150}},
               "required": ["name", "age"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1,
              "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                              "size": {"enum": [1, 2, 3, None]}},
             "required": ["color", "size"]},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                  "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                           "maxItems": 3}},
                 "required": ["id", "tags"], "additionalProperties": False},
        "ok": {"type": "boolean"}}, "required": ["user", "ok"], "additionalProperties": False},
    "bounded_number": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 10, "maximum": 20},
                                                        "y": {"type": "integer", "exclusiveMaximum": 3,
                                                              "minimum": 0}},
                       "required": ["x", "y"], "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
                "required": ["code"], "additionalProperties": False},
    "anyOf": {"type": "object", "properties": {"v": {"anyOf": [{"type": "boolean"},
                                                               {"type": "string", "maxLength": 4}]}},
              "required": ["v"], "additionalProperties": False},
    "oneOf": {"type": "object", "properties": {"v": {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                               {"type": "null"}]}},
              "required": ["v"], "additionalProperties": False},
    "refs": {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9},
                                                                    "y": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9}},
                                 "required": ["x", "y"], "additionalProperties": False}},
             "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
             "required": ["a", "b"], "additionalProperties": False},
    "const": {"type": "object", "properties": {"kind": {"const": "a long constant part of the output"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["kind", "n"], "additionalProperties": False},
}


@pytest.mark.parametrize("name", SCHEMAS)
def test_finished_json_validates_against_its_schema(m, name):
    schema = SCHEMAS[name]
    results = m.generate_batch(["Data:", "JSON:", "{", "Output:"], 200, constraint=Constraint.json_schema(schema),
                               temperature=1.0, seed=5)
    results.append(m.complete("Data:", 200, constraint={"json": schema}))  # greedy
    for g in results:
        assert g.stop_reason == "stop", (g.text, g.stop_reason)
        jsonschema.validate(json.loads(g.text), schema, format_checker=jsonschema.FormatChecker())
        assert not re.search(r"\s", re.sub(r'"(?:\\.|[^"\\])*"', '""', g.text)), g.text  # compact


def test_any_json_object(m):
    for g in m.generate_batch(["a", "b", "c"], 200, constraint={"json_object": True}, temperature=1.0, seed=1,
                              logit_bias={90: 10, 1: 3}):  # '{', '"' ... and '}' (token 92) likely enough
        if g.stop_reason == "stop":
            assert isinstance(json.loads(g.text), dict)
        else:
            assert g.stop_reason == "length" and g.text.startswith("{")


def test_a_cut_output_is_a_prefix_that_could_still_complete(m):
    schema = SCHEMAS["nested"]
    full = m.complete("Data:", 200, constraint={"json": schema})
    cut = m.complete("Data:", 5, constraint={"json": schema})
    assert cut.stop_reason == "length" and len(cut.ids) == 5
    assert full.text.startswith(cut.text)


REGEXES = [r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r"(cat|dog|bird)s?", r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)",
           r"-?[1-9][0-9]{0,3}(\.[0-9]{1,2})?", r"(yes|no), because [a-z ]{1,12}\."]


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_outputs_fullmatch_under_pythons_re(m, pattern):
    results = m.generate_batch(["x", "Answer:", "The"], 80, constraint={"regex": pattern}, temperature=1.0, seed=2)
    results.append(m.complete("x", 80, constraint=Constraint.regex(pattern)))
    for g in results:
        assert g.stop_reason == "stop" and re.fullmatch(pattern, g.text), (pattern, g.text)


LARK = r"""
start: expr
expr: term (OP term)?
term: NUMBER | "(" NUMBER "*" NUMBER ")"
OP: "+" | "-"
NUMBER: /[0-9]{1,3}/
"""


def test_lark_outputs_parse_with_the_lark_package(m):
    parser = lark.Lark(LARK)
    results = m.generate_batch(["Sum:", "2+2=", "Calc"], 40, constraint={"grammar": LARK}, temperature=1.0, seed=4)
    results.append(m.complete("Sum:", 40, constraint=Constraint.grammar(LARK)))
    for g in results:
        assert g.stop_reason == "stop"
        parser.parse(g.text)


def test_gbnf_grammar(m):
    gbnf = 'root ::= answer " (" [0-9] ")"\nanswer ::= "yes" | "no" | "maybe"'
    for g in m.generate_batch(["Q:", "A:"], 30, constraint={"grammar": gbnf}, temperature=1.0, seed=7):
        assert g.stop_reason == "stop" and re.fullmatch(r"(yes|no|maybe) \([0-9]\)", g.text), g.text


# ------------------------------------------------------------------ the distribution over what is allowed

def allowed_by_choices(tokenizer, choices: list[str], text: bytes) -> np.ndarray:
    """Brute force over the vocabulary: the tokens after `text` that keep it a prefix of a
    choice, and <|endoftext|> where it is one. Where the rest is forced (one continuation, no
    end), only the first of the forced text's canonical tokens, less those at its end that a
    token spanning the end could merge with (llguidance's documented rule, docs/run.md)."""
    live = [c.encode()[len(text):] for c in choices if c.encode().startswith(text)]
    token_bytes = tokenizer.token_bytes()
    mask = np.zeros(len(token_bytes), bool)
    n = 0  # the bytes every continuation shares (none if the text may end here)
    while b"" not in live and all(len(r) > n for r in live) and len({r[n] for r in live}) == 1:
        n += 1
    forced = live[0][:n]
    if forced:
        tokens = tokenizer.encode(forced.decode())
        for idx in range(max(0, len(forced) - len(tokenizer.decode_bytes(tokens[-4:]))), len(forced)):
            if any(b.startswith(forced[idx:]) and len(b) > len(forced) - idx
                   and any(r.startswith(forced[:idx] + b) for r in live) for i, b in token_bytes.items() if i != 50256):
                while len(tokenizer.decode_bytes(tokens)) > idx:
                    tokens.pop()
                break
        if tokens:
            mask[tokens[0]] = True
            return mask
    for i, b in token_bytes.items():
        if i == 50256:
            mask[i] = b"" in live
        elif b:
            mask[i] = any(r.startswith(b) for r in live)
    return mask


def test_greedy_choice_is_the_argmax_over_the_allowed_tokens(m):
    choices = ["positive", "negative", "neutral", "mixed feelings", "yes", "yes please", "nope"]
    for prompt in ["Sentiment:", "The answer is", "Is it"]:
        g = m.complete(prompt, 20, constraint={"choice": choices}, fast_forward=False)
        ids, text = m.encode(prompt), b""
        expected = []
        while True:
            logits = m.logits(ids)[-1]
            token = int(np.argmax(np.where(allowed_by_choices(m.tokenizer, choices, text), logits, -np.inf)))
            expected.append(token)
            if token == 50256:
                break
            ids, text = ids + [token], text + m.tokenizer.decode_bytes([token])
            if not any(c.encode().startswith(text) and c.encode() != text for c in choices):
                break  # complete, and nothing can follow: the generation ends without a token
        assert g.ids == expected, (prompt, g.text)
        assert g.text in choices and g.stop_reason == "stop" and g.forced == 0


def chi_square_ok(counts: np.ndarray, p: np.ndarray) -> bool:
    """Pearson's test at p = 0.001 (Wilson-Hilferty's approximation of the critical value)."""
    df = len(p) - 1
    stat = ((counts - counts.sum() * p) ** 2 / (counts.sum() * p)).sum()
    critical = df * (1 - 2 / (9 * df) + 3.0902 * np.sqrt(2 / (9 * df))) ** 3
    return stat < critical


@pytest.mark.parametrize("options", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 3},
                                     {"temperature": 1.3, "logit_bias": {16: 2.0}}])
def test_sampled_tokens_follow_the_renormalised_probabilities(m, options):
    choices = [str(d) for d in range(5)]  # each a single token ("0" is 15 ... "4" is 19)
    ids = m.encode("Pick a digit:")
    z = m.logits(ids)[-1].astype(np.float64)
    for token, bias in options.get("logit_bias", {}).items():
        z[token] += bias
    digits = np.array([m.encode(c)[0] for c in choices])
    zd = z[digits] / options["temperature"]
    keep = np.argsort(-zd)[:options.get("top_k", len(digits))]
    p = np.zeros(len(digits))
    p[keep] = np.exp(zd[keep] - zd[keep].max())
    p /= p.sum()
    n = 3000
    engine, seqs = m.queue([ids] * n, 1, seeds=range(n), constraint={"choice": choices}, **options)
    engine.run()
    counts = np.array([sum(s.result.ids == [int(d)] for s in seqs) for d in digits], float)
    assert counts.sum() == n
    assert (counts[p == 0] == 0).all()
    assert chi_square_ok(counts[p > 0], p[p > 0]), (counts, p * n)


def test_logprobs_are_the_models_own_distribution(m):
    g = m.complete("Pick:", 5, constraint={"choice": ["alpha", "beta"]}, logprobs=3)
    prompt = m.encode("Pick:")
    logits = m.logits(prompt + g.ids[:-1])[len(prompt) - 1:]
    z = logits.astype(np.float64)
    lp = z - z.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    np.testing.assert_allclose(g.logprobs, lp[np.arange(len(g.ids)), g.ids], atol=1e-5)
    for row, top in zip(lp, g.top_logprobs):  # the unconstrained alternatives
        assert list(top) == list(np.argsort(-row, kind="stable")[:3])


# ------------------------------------------------------------------ fast-forward

def test_fast_forwarded_tokens_are_canonical_whatever_follows(m):
    from gpt2np.structured import Guide

    tok = m.tokenizer
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "kind": {"const": "record v2"},
                                               "id": {"type": "integer"}}, "required": ["name", "kind", "id"],
              "additionalProperties": False}
    guide = Guide(Constraint.json_schema(schema), tok, 50257)
    rng = np.random.default_rng(0)
    followers = [tok.decode([int(i)]) for i in rng.integers(0, 50256, 300)] + ['":"', '","', "a", " ", '"']
    rest, checked = '{"name":"Bob","kind":"record v2","id":42}', 0
    while rest:
        forced = guide.forced()
        if forced:
            text = guide.matcher.compute_ff_bytes().decode()
            assert forced == tok.encode(text)[:len(forced)] and rest.startswith(tok.decode(forced))
            for f in followers:  # stays the same whatever follows
                assert tok.encode(text + f)[:len(forced)] == forced, (text, f)
            checked += 1
        else:
            forced = tok.encode(rest)[:1]  # a free token
        guide.consume(forced)
        rest = rest[len(tok.decode(forced)):]
    assert guide.finished
    assert checked >= 2
    # The first forced run stops before '":"', which merges with a free value after it.
    g0 = Guide(Constraint.json_schema(schema), tok, 50257)
    assert g0.forced() == tok.encode('{"name')
    g0.consume(g0.forced())
    g0.fill()
    assert g0.allowed[tok.encode('":"')[0]]


def test_fast_forward_appends_forced_text_in_fewer_passes(m):
    schema = SCHEMAS["const"]
    on = m.complete("Data:", 100, constraint={"json": schema})
    off = m.complete("Data:", 100, constraint={"json": schema}, fast_forward=False)
    # All the output but one digit is forced: the same text either way, on from fewer steps.
    assert on.text == off.text and on.stop_reason == off.stop_reason == "stop"
    assert on.forced >= len(on.ids) - 3 and off.forced == 0
    assert on.ids == m.encode(on.text)  # canonical tokens
    engine, (seq,) = m.queue(["Data:"], 100, constraint={"json": schema})
    steps = 0
    while not engine.idle:
        engine.step()
        steps += 1
    assert steps <= 4 and seq.result.text == on.text, steps


def test_greedy_text_is_the_same_with_and_without_fast_forward_where_the_rest_is_forced(m):
    for constraint in [{"choice": ["mixed feelings about it", "neutral"]},
                       {"json": {"const": {"a": [1, 2, 3], "b": "constant text"}}},
                       {"regex": "The (quick brown fox|lazy dog) jumps"}]:
        on = m.complete("Q:", 60, constraint=constraint)
        off = m.complete("Q:", 60, constraint=constraint, fast_forward=False)
        assert on.text == off.text and on.stop_reason == off.stop_reason == "stop", (on.text, off.text)
        assert on.forced > 0


def test_fast_forward_respects_the_token_limit_and_stop_strings(m):
    schema = {"const": "one two three four five six seven"}
    g = m.complete("Q:", 3, constraint={"json": schema})
    assert len(g.ids) == 3 and g.stop_reason == "length"
    g = m.complete("Q:", 50, constraint={"json": schema}, stop=["four"])
    assert g.stop_reason == "stop" and g.text == '"one two three '


# ------------------------------------------------------------------ batches and streams

def test_batch_equals_alone_and_neighbours_are_unchanged(m):
    jobs = [("A:", {"constraint": {"json": SCHEMAS["object"]}, "temperature": 1.0, "seed": 3}),
            ("B:", {"temperature": 1.0, "seed": 4}),
            ("C:", {"constraint": {"regex": REGEXES[2]}}),
            ("D:", {}),
            ("E:", {"constraint": {"choice": ["left", "right"]}, "temperature": 0.8, "seed": 9})]
    alone = [m.complete(p, 60, **o) for p, o in jobs]
    engine = m.engine()
    seqs = [engine.add(m.encode(p), m.options(60, **o)) for p, o in jobs]
    engine.run()
    for a, s in zip(alone, seqs):
        assert s.result.ids == a.ids and s.result.text == a.text and s.result.stop_reason == a.stop_reason


def test_stream_equals_complete(m):
    stream = m.generate("S:", 60, constraint={"json": SCHEMAS["refs"]})
    pieces = list(stream)
    whole = m.complete("S:", 60, constraint={"json": SCHEMAS["refs"]})
    assert "".join(pieces) == whole.text == stream.result.text
    ids = list(m.generate_ids("S:", 60, constraint={"json": SCHEMAS["refs"]}))
    assert ids == whole.ids


def test_per_prompt_constraints(m):
    engine, seqs = m.queue(["a", "b", "c"], 40, strict=False,
                           constraints=[{"choice": ["x1", "y2"]}, None, {"regex": "("}])
    engine.run()
    assert seqs[0].result.text in ("x1", "y2")
    assert seqs[1].result.stop_reason == "length"
    assert seqs[2].result.stop_reason == "error" and "regular expression" in seqs[2].result.error


# ------------------------------------------------------------------ bad and hostile input

BAD = [
    ({"json": {"type": "foo"}}, "JSON schema"),
    ({"json": {"not": {"type": "string"}}}, "not"),
    ({"json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ({"json": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}, "oneOf"),
    ({"json": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}}, "JSON schema"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": [1, 2]}, "JSON object"),
    ({"regex": "(a"}, "regular expression"),
    ({"regex": ""}, "regular expression"),
    ({"choice": []}, "at least one"),
    ({"choice": "yes"}, "list of strings"),
    ({"grammar": 'start: "a" ('}, "grammar"),
    ({"grammar": 'root ::= "yes'}, "grammar"),
    ({"regex": "a", "choice": ["a"]}, "exactly one"),
    ({"xml": "<a/>"}, "unknown constraint"),
    ({}, "exactly one"),
    ("regex", "a Constraint"),
]


@pytest.mark.parametrize("constraint,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_constraints_are_one_line_errors_before_any_token(m, constraint, words):
    with pytest.raises(GPT2Error) as e:
        m.complete("x", 5, constraint=constraint)
    assert e.value.field == "constraint" and words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_hostile_constraints_are_bounded(m):
    deep = '{"type":"string"}'
    for _ in range(400):
        deep = '{"type":"object","properties":{"a":%s},"required":["a"]}' % deep
    started = time.perf_counter()
    with pytest.raises(GPT2Error, match="JSON schema"):
        m.complete("x", 5, constraint=Constraint.json_schema(deep))
    # A pattern whose automaton would blow up, and a 20 KB choice: compiled lazily, within bounds.
    g = m.complete("x", 8, constraint={"regex": r"(a|aa)*b{1000}{1000}"})
    assert g.stop_reason in ("length", "error")
    big = [f"option number {i}" for i in range(1300)]
    assert len(json.dumps(big)) > 20_000
    assert m.complete("x", 12, constraint={"choice": big}).text in big
    with pytest.raises(GPT2Error, match="longer than"):
        Constraint.regex("a" * 200_000)
    assert time.perf_counter() - started < 20


def test_a_constraint_without_the_extra_is_the_missing_extra_error(small_model_dir):
    code = ("import sys; sys.modules['llguidance'] = None\n"
            "import gpt2np\n"
            f"m = gpt2np.load({str(small_model_dir)!r})\n"
            "print(m.complete('x', 3).stop_reason)\n"
            "try:\n    m.complete('x', 3, constraint={'regex': 'a+'})\n"
            "except gpt2np.GPT2Error as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "length"
    assert "needs the extra 'structured'" in lines[1] and "pip install 'gpt2np[structured]'" in lines[1]


def test_importing_gpt2np_loads_no_constraint_library(small_model_dir):
    code = ("import sys, gpt2np\n"
            f"gpt2np.load({str(small_model_dir)!r}).complete('x', 3)\n"
            "print('llguidance' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_our_tokens_are_llguidances(m):
    from gpt2np.structured.compiler import ll_tokenizer

    lt = ll_tokenizer(m.tokenizer)
    texts = ['{"name":"Bob","age":42}', "Hello world!  It's 2026.\n\n", "naïve café — 東京 🙂", " \t x  y",
             "'s're've", "a" * 50]
    for text in texts:
        assert lt.tokenize_str(text) == m.encode(text), text
    # Token 187 is the byte 0xFF, never part of UTF-8 text: no constraint allows it.
    from gpt2np.structured import Guide
    g = Guide(Constraint.regex(r"(?s:.{1,20})"), m.tokenizer, 50257)
    g.fill()
    assert not g.allowed[187] and g.allowed[m.encode("a")[0]]


def test_the_engines_steps_compile_nothing(m, monkeypatch):
    """A constraint is compiled, and its first mask made, where the sequence is made (the server:
    a request's worker thread), never in the engine's steps: they only fill masks."""
    import llguidance

    from gpt2np.structured import compiler

    engine = m.engine()
    made = engine.sequence(m.encode("x"), m.options(40, constraint={"json": SCHEMAS["nested"]}))
    assert made.guide.allowed is not None and made.guide.compile_s > 0
    engine.submit(made)

    def refuse(*args, **kwargs):
        raise AssertionError("compiled during a step")

    monkeypatch.setattr(llguidance, "LLMatcher", refuse)
    monkeypatch.setattr(compiler, "compile_constraint", refuse)
    engine.run()
    assert made.result.stop_reason == "stop" and made.result.error is None
    jsonschema.validate(json.loads(made.result.text), SCHEMAS["nested"])
