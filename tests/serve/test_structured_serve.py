"""Structured outputs through a real `gpt-serve` on loopback: OpenAI's `response_format`, vLLM's
`structured_outputs` and llama.cpp's `json_schema` and `grammar`, with the official `openai`
client; outputs checked with `jsonschema`, `re` and `lark`; streams, batches, bad and hostile
constraints (a 400 naming the field, and the server goes on), and the metrics."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time

import httpx
import jsonschema
import lark
import openai
import pytest

from conftest import SMALL_HPARAMS, write_model_dir
from helpers.make_checkpoint import random_openai_weights
from helpers.serve_process import ServerProcess

MODEL = "gpt2-test"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "population": {"type": "integer", "minimum": 0, "maximum": 10_000_000},
                                           "capital": {"type": "boolean"}},
          "required": ["city", "population", "capital"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    hp = {**SMALL_HPARAMS, "n_ctx": 256}
    folder = write_model_dir(tmp_path_factory.mktemp("s256") / "model", hp, random_openai_weights(hp, seed=3))
    with ServerProcess(folder, "--model-name", MODEL, "--max-batch", "8") as s:
        yield s
        output = s.output()
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def complete(client, **body):
    prompt, max_tokens = body.pop("prompt", "Data:"), body.pop("max_tokens", 80)
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, extra_body=body)


def test_openai_response_format_json_schema_and_json_object(client):
    r = complete(client, response_format={"type": "json_schema",
                                          "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}},
                 temperature=1.0, seed=1, n=3)
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), SCHEMA)
    o = complete(client, response_format={"type": "json_object"}, max_tokens=60, logit_bias={"92": 8})
    assert o.choices[0].text.startswith("{")
    if o.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(o.choices[0].text), dict)
    plain = complete(client, response_format={"type": "text"}, max_tokens=5, ignore_eos=True)
    assert plain.choices[0].finish_reason == "length" and len(plain.choices) == 1


def test_vllm_structured_outputs(client):
    j = complete(client, structured_outputs={"json": SCHEMA})
    jsonschema.validate(json.loads(j.choices[0].text), SCHEMA)
    r = complete(client, structured_outputs={"regex": r"[A-Z][a-z]{2,6} [0-9]{1,2}"}, temperature=0.9, seed=2, n=2)
    assert all(re.fullmatch(r"[A-Z][a-z]{2,6} [0-9]{1,2}", c.text) for c in r.choices)
    c = complete(client, structured_outputs={"choice": ["Positive", "Negative", "Mixed feelings"]})
    assert c.choices[0].text in ("Positive", "Negative", "Mixed feelings")
    grammar = 'start: NAME "(" ARG ("," ARG)? ")"\nNAME: /[a-z]{1,8}/\nARG: /[0-9]{1,2}/\n'
    g = complete(client, structured_outputs={"grammar": grammar}, temperature=1.0, seed=5)
    lark.Lark(grammar).parse(g.choices[0].text)
    o = complete(client, structured_outputs={"json_object": True}, max_tokens=40)
    assert o.choices[0].text.startswith("{")


def test_llama_cpp_json_schema_and_gbnf_grammar(server):
    j = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Data:", "max_tokens": 80, "json_schema": SCHEMA})
    assert j.status_code == 200
    jsonschema.validate(json.loads(j.json()["choices"][0]["text"]), SCHEMA)
    gbnf = 'root ::= "Answer: " ("yes" | "no") "."\n'
    g = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Q?", "max_tokens": 20, "grammar": gbnf})
    assert g.json()["choices"][0]["text"] in ("Answer: yes.", "Answer: no.")


def test_stream_equals_non_stream_with_logprobs(client):
    body = dict(structured_outputs={"json": SCHEMA}, logprobs=2, temperature=0.8, seed=11)
    whole = complete(client, **body)
    chunks = list(client.completions.create(model=MODEL, prompt="Data:", max_tokens=80, stream=True,
                                            extra_body=body))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == whole.choices[0].logprobs.tokens and "".join(tokens) == text
    assert chunks[-1].choices[0].finish_reason == "stop"
    off = complete(client, **body, fast_forward=False)
    jsonschema.validate(json.loads(off.choices[0].text), SCHEMA)


def test_batched_requests_each_keep_their_own_constraint(client):
    jobs = [dict(structured_outputs={"json": SCHEMA}, temperature=1.0, seed=3),
            dict(temperature=1.0, seed=4, ignore_eos=True, max_tokens=30),
            dict(structured_outputs={"choice": ["left", "right"]}, temperature=0.7, seed=5),
            dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
                 temperature=0),
            dict(max_tokens=30, ignore_eos=True, temperature=0)]
    alone = [complete(client, **dict(j)).choices[0].text for j in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs) * 2) as pool:
        together = list(pool.map(lambda j: complete(client, **dict(j)).choices[0].text, jobs * 2))
    assert together == alone * 2


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", "JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format", '"not"'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs", "regular expression"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "at least 1 item"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"yaml": "a"}}, "structured_outputs", "unknown field"),
    ({"grammar": 'root ::= "a'}, "grammar", "grammar"),
    ({"json_schema": {"type": "array", "uniqueItems": True}}, "json_schema", "uniqueItems"),
    ({"json_schema": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}}, "json_schema", "JSON schema"),
    ({"grammar": "root ::= \"a\"", "structured_outputs": {"regex": "a"}}, "grammar", "at most one"),
]


@pytest.mark.parametrize("body,param,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_constraints_are_400_naming_the_field(server, body, param, words):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error", error
    if "at most one" in words:
        assert error["code"] == "multiple_constraints"
    ok = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_hostile_constraints_answer_within_seconds_and_streams_go_on(server):
    deep = '{"type":"string"}'
    for _ in range(400):
        deep = '{"type":"object","properties":{"a":%s},"required":["a"]}' % deep
    hostile = [{"structured_outputs": {"json": deep}},
               {"structured_outputs": {"regex": r"(a|aa)*b{1000}{1000}"}},
               {"structured_outputs": {"choice": [f"option number {i}" for i in range(1300)]}},
               {"structured_outputs": {"grammar": "start: " + " | ".join(f'"w{i}"' for i in range(3000))}}]
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/completions",
                         json={"model": MODEL, "prompt": "x", "max_tokens": 150, "ignore_eos": True,
                               "stream": True}) as stream:
            lines = stream.iter_lines()
            next(lines)
            for body in hostile:
                started = time.monotonic()
                r = http.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 8,
                                                                     **body})
                assert time.monotonic() - started < 10
                assert r.status_code in (200, 400) and "Traceback" not in r.text, r.text
            events = [line for line in lines if line]
            assert events[-1] == "data: [DONE]" and len(events) > 50


def test_metrics_count_constrained_requests(server, client):
    before = server.metric("gpt2np_constrained_requests_total")
    forced = server.metric("gpt2np_constraint_forced_tokens_total")
    compiles = server.metric("gpt2np_constraint_compile_seconds_count")
    complete(client, structured_outputs={"choice": ["a long forced choice of many words"]}, n=2)
    assert server.metric("gpt2np_constrained_requests_total") == before + 1
    assert server.metric("gpt2np_constraint_compile_seconds_count") == compiles + 2
    assert server.metric("gpt2np_constraint_forced_tokens_total") > forced
    assert server.metric("gpt2np_constraint_mask_seconds_count") > 0


def test_openapi_states_the_constraint_fields(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    props = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"response_format", "structured_outputs", "json_schema", "grammar", "fast_forward"} <= set(props)
    assert "multiple_constraints" in json.dumps(spec)
