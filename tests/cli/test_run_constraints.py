"""`gpt-run`'s constraint flags as a user runs them (real subprocesses): the same output as the
Python API, each kind, --prompts-file, --no-fast-forward, and bad input as one line with exit 1."""

import json
import re

import jsonschema
import lark
import pytest

from conftest import run_cli

SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["answer", "score"], "additionalProperties": False}


def test_json_schema_inline_and_from_a_file(tmp_path, small_model_dir, model):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    inline = run_cli("gpt-run", str(small_model_dir), "Verdict:", "-n", "30", "--json-schema", json.dumps(SCHEMA))
    from_file = run_cli("gpt-run", str(small_model_dir), "Verdict:", "-n", "30", "--json-schema", str(path))
    assert inline.returncode == 0 and inline.stdout == from_file.stdout, inline.stderr
    jsonschema.validate(json.loads(inline.stdout), SCHEMA)
    assert inline.stdout.decode() == model.complete("Verdict:", 30, constraint={"json": SCHEMA}).text
    off = run_cli("gpt-run", str(small_model_dir), "Verdict:", "-n", "30", "--json-schema", str(path),
                  "--no-fast-forward", "--json")
    assert json.loads(off.stdout)["text"] == inline.stdout.decode()


def test_regex_choice_grammar_and_json_object(tmp_path, small_model_dir):
    r = run_cli("gpt-run", str(small_model_dir), "Date:", "--regex", "[0-9]{4}-[0-9]{2}-[0-9]{2}",
                "--temperature", "1", "--seed", "1")
    assert r.returncode == 0 and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r.stdout.decode())
    c = run_cli("gpt-run", str(small_model_dir), "Mood:", "--choice", "happy", "--choice", "sad", "--json")
    out = json.loads(c.stdout)
    assert out["text"] in ("happy", "sad") and out["stop_reason"] == "stop"
    lark_file = tmp_path / "g.lark"
    lark_file.write_text('start: WORD " = " NUM\nWORD: /[a-z]{1,6}/\nNUM: /[0-9]{1,3}/\n')
    g = run_cli("gpt-run", str(small_model_dir), "Let", "--grammar", str(lark_file), "--temperature", "1",
                "--seed", "2")
    assert g.returncode == 0, g.stderr
    lark.Lark(lark_file.read_text()).parse(g.stdout.decode())
    gbnf = tmp_path / "g.gbnf"
    gbnf.write_text('root ::= ("on" | "off") "!"\n')
    b = run_cli("gpt-run", str(small_model_dir), "Switch", "--grammar", str(gbnf))
    assert b.stdout.decode() in ("on!", "off!")
    o = run_cli("gpt-run", str(small_model_dir), "{", "--json-object", "-n", "40", "--json")
    assert json.loads(o.stdout)["text"].startswith("{")


def test_prompts_file_applies_the_constraint_to_every_prompt(tmp_path, small_model_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n")
    r = run_cli("gpt-run", str(small_model_dir), "--prompts-file", str(prompts), "--json-schema", json.dumps(SCHEMA),
                "-n", "30", "--temperature", "1", "--seed", "4")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 3
    for row in rows:
        jsonschema.validate(json.loads(row["text"]), SCHEMA)


@pytest.mark.parametrize("flags,status,words", [
    (["--regex", "(a"], 1, "regular expression cannot be used"),
    (["--json-schema", '{"type": "object", "not": {}}'], 1, '"not"'),
    (["--json-schema", "{broken"], 1, "not valid JSON"),
    (["--json-schema", "missing.json"], 1, "cannot read the JSON schema"),
    (["--grammar", "missing.lark"], 1, "cannot read the grammar"),
    (["--regex", "a", "--choice", "a"], 2, "give one constraint"),
])
def test_bad_constraints_are_one_line_and_nothing_is_printed(small_model_dir, flags, status, words):
    r = run_cli("gpt-run", str(small_model_dir), "x", *flags)
    err = r.stderr.decode()
    assert r.returncode == status and words in err and err.count("\n") == 1 and not r.stdout, err
    assert "Traceback" not in err
    p = run_cli("gpt-run", str(small_model_dir), "--prompts-file", "-", *flags, input=b"a\nb\n")
    assert p.returncode == status and words in p.stderr.decode() and not p.stdout


def test_gpt_explain_takes_the_same_constraint(tmp_path, small_model_dir, model):
    out = tmp_path / "e.html"
    r = run_cli("gpt-explain", str(small_model_dir), "Mood:", "--choice", "happy days", "--choice", "sad",
                "-o", str(out))
    assert r.returncode == 0, r.stderr
    page = out.read_text(encoding="utf-8")
    expected = model.complete("Mood:", 50, constraint={"choice": ["happy days", "sad"]})
    assert '"constraint": {"choice": ["happy days", "sad"]}' in page
    assert f'"text": {json.dumps(expected.text)}, "stop_reason": "stop"' in page
