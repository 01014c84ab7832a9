"""`gpt-run` as a user runs it: a real subprocess, streaming, stdin, errors."""

import json
import subprocess

import pytest

import gpt2np
from conftest import BIN, SMALL_HPARAMS, run_cli

tf_reference = pytest.importorskip("helpers.tf_reference")


def assert_one_line_error(result, *fragments):
    err = result.stderr.decode()
    assert result.returncode != 0
    assert result.stdout == b""
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_help():
    result = run_cli("gpt-run", "--help")
    assert result.returncode == 0
    for word in ("MODEL_DIR", "PROMPT", "--n-tokens", "stdin", "--ignore-eos"):
        assert word in result.stdout.decode()


def test_output_is_the_reference_greedy_continuation(small_model_dir, small_weights, tokenizer):
    prompt = "The answer to the question is"
    ids = tokenizer.encode(prompt)
    expected, _ = tf_reference.greedy(small_weights, SMALL_HPARAMS, ids, 20)
    if 50256 in expected:
        expected = expected[:expected.index(50256)]
    result = run_cli("gpt-run", str(small_model_dir), prompt, "-n", "20")
    assert result.returncode == 0, result.stderr
    assert result.stdout == tokenizer.decode_bytes(expected).decode("utf-8", "replace").encode()


def test_prompt_from_stdin_is_kept_byte_for_byte(small_model_dir):
    prompt = "Zürich 日本\n  trailing spaces and a newline\n"
    from_arg = run_cli("gpt-run", str(small_model_dir), prompt, "-n", "10", "--ignore-eos")
    from_stdin = run_cli("gpt-run", str(small_model_dir), "-", "-n", "10", "--ignore-eos",
                         input=prompt.encode())
    assert from_arg.returncode == 0 and from_stdin.returncode == 0
    assert from_stdin.stdout == from_arg.stdout
    model = gpt2np.load(small_model_dir)
    assert from_arg.stdout.decode() == "".join(model.generate(prompt, 10, stop_at_eos=False))
    stripped = run_cli("gpt-run", str(small_model_dir), prompt.rstrip("\n"), "-n", "10", "--ignore-eos")
    assert stripped.stdout != from_stdin.stdout  # the newline really is part of the prompt


def test_text_streams_before_generation_ends(model_124M_dir):
    proc = subprocess.Popen([str(BIN / "gpt-run"), str(model_124M_dir), "Hello", "-n", "200", "--ignore-eos"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.read1(1)
        assert first, proc.stderr.read()
        assert proc.poll() is None, "the first text appeared only when the process was done"
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("args, stdin, fragments", [
    (["/nonexistent/model", "hi"], None, ["gpt-run: error:", "/nonexistent/model", "no such directory"]),
    (["{model}", "-"], b" word" * 70, ["the prompt is 70 tokens", "context is 64"]),
    (["{model}", "hi", "--score", "-"], None, ["exactly one of PROMPT, --prompts-file, --score or --verify"]),
    (["{model}"], None, ["exactly one of PROMPT"]),
    (["{model}", "--prompts-file", "/nonexistent.txt"], None, ["cannot read the prompts file"]),
    (["{model}", "--score", "-", "--stride", "64"], b"text", ["stride must be a whole number from 1 to 63"]),
    (["{model}", "hi", "--top-p", "0"], None, ["--top-p"]),
    (["{model}", "hi", "--temperature", "-1"], None, ["--temperature"]),
    (["{model}", "-"], b"caf\xe9\n", ["not valid UTF-8"]),
    (["{model}", "hi", "-n", "-3"], None, ["-3"]),
])
def test_errors_are_one_line_with_non_zero_exit(small_model_dir, args, stdin, fragments):
    args = [a.replace("{model}", str(small_model_dir)) for a in args]
    assert_one_line_error(run_cli("gpt-run", *args, input=stdin), *fragments)


def test_not_a_model_folder(tmp_path):
    assert_one_line_error(run_cli("gpt-run", str(tmp_path), "hi"), "missing config.json")


def test_json_logprobs_are_one_float_per_token(small_model_dir):
    """gpt-run --json: each generated token's log-probability equals its entry among the top N, to
    the last bit, and a greedy token's is the largest there; likewise the API's prompt scores."""
    r = run_cli("gpt-run", str(small_model_dir), "The same float", "-n", "12", "--json", "--logprobs", "5",
                "--ignore-eos")
    assert r.returncode == 0, r.stderr.decode()
    g = json.loads(r.stdout)
    assert len(g["ids"]) == 12
    for token, lp, top in zip(g["ids"], g["logprobs"], g["top_logprobs"]):
        assert top[str(token)] == lp == max(top.values())
    model = gpt2np.load(small_model_dir)
    own = model.complete("The same float", 8, stop_at_eos=False)  # a prompt that ends in greedy tokens
    p = model.complete(own.prompt_ids + own.ids, 0, prompt_logprobs=5)
    inside = [(t, lp, top) for t, lp, top in zip(p.prompt_ids[1:], p.prompt_logprobs[1:], p.prompt_top_logprobs[1:])
              if t in top]
    assert len(inside) >= 8
    assert all(top[t] == lp for t, lp, top in inside)
    assert all(max(top.values()) == top[next(iter(top))] for _, _, top in inside)


def test_prompts_file_and_score_with_a_prefix_cache(small_model_dir, tmp_path):
    """--prefix-cache-mb changes how much is computed, not what comes out (greedy)."""
    shared = "A long shared beginning that every prompt in this file starts with, word for word, " * 2
    (tmp_path / "p.txt").write_text("".join(f"{shared}then prompt {i}\n" for i in range(4)))
    plain = run_cli("gpt-run", str(small_model_dir), "--prompts-file", str(tmp_path / "p.txt"), "-n", "5")
    cached = run_cli("gpt-run", str(small_model_dir), "--prompts-file", str(tmp_path / "p.txt"), "-n", "5",
                     "--prefix-cache-mb", "16")
    assert plain.returncode == cached.returncode == 0, cached.stderr.decode()
    rows = [json.loads(line) for line in cached.stdout.splitlines()]
    assert [r["ids"] for r in rows] == [json.loads(line)["ids"] for line in plain.stdout.splitlines()]
    bad = run_cli("gpt-run", str(small_model_dir), "--prompts-file", str(tmp_path / "p.txt"), "--prefix-cache-mb", "-1")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1
