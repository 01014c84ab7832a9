"""`gpt-run`'s generation, batch and scoring options as a user runs them (real subprocesses):
the same results as the Python API, flags built from `Options`, JSON output, errors."""

import json

import numpy as np

import gpt2np
from conftest import run_cli


def test_cli_sampling_is_reproducible_and_json_is_complete(small_model_dir):
    args = [str(small_model_dir), "Hello there", "-n", "12", "--temperature", "0.9", "--top-k", "40",
            "--top-p", "0.95", "--seed", "3", "--ignore-eos"]
    a, b = run_cli("gpt-run", *args), run_cli("gpt-run", *args)
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout
    j = run_cli("gpt-run", *args, "--json", "--stats")
    assert j.returncode == 0, j.stderr
    out = json.loads(j.stdout)
    assert out["text"].encode() == a.stdout and len(out["ids"]) == len(out["logprobs"]) == 12
    assert out["prompt"] == "Hello there" and out["stop_reason"] == "length" and out["prompt_ids"]
    assert set(out["timings"]) == {"prefill_s", "decode_s", "tokens_per_s"}
    assert b"tokens/s" in j.stderr
    greedy = run_cli("gpt-run", str(small_model_dir), "Hello there", "-n", "12", "--ignore-eos")
    assert greedy.stdout != a.stdout


def test_cli_stop_strings_and_context_note(small_model_dir, model):
    text = model.complete("Once upon a time", 30, stop_at_eos=False).text
    stop = text[6:9]
    r = run_cli("gpt-run", str(small_model_dir), "Once upon a time", "-n", "30", "--ignore-eos", "--stop", stop)
    assert r.returncode == 0 and r.stdout.decode() == text[:text.index(stop)]
    full = run_cli("gpt-run", str(small_model_dir), "word " * 50, "-n", "40", "--ignore-eos")
    assert full.returncode == 0 and b"context of 64 positions is full" in full.stderr
    slid = run_cli("gpt-run", str(small_model_dir), "word " * 50, "-n", "40", "--ignore-eos", "--sliding-window",
                   "--json")
    assert json.loads(slid.stdout)["stop_reason"] == "length" and len(json.loads(slid.stdout)["ids"]) == 40


def test_cli_prompts_file_gives_json_lines_in_order(tmp_path, small_model_dir, model):
    prompts = ["first prompt", "second, longer prompt here", "", "third ☃"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in prompts + ["line\nbreak"]))
    r = run_cli("gpt-run", str(small_model_dir), "--prompts-file", str(tmp_path / "p.txt"), "-n", "8",
                "--ignore-eos", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.decode().splitlines()]
    kept = [p for p in prompts if p.strip()]  # blank lines are skipped in a text file
    assert [x["index"] for x in lines] == list(range(len(kept))) and [x["prompt"] for x in lines] == kept
    assert [x["ids"] for x in lines] == [model.complete(p, 8, stop_at_eos=False).ids for p in kept]
    r = run_cli("gpt-run", str(small_model_dir), "--prompts-file", "-", "-n", "4",
                input=(tmp_path / "p.txt").read_bytes())
    assert len(r.stdout.splitlines()) == len(kept)
    r = run_cli("gpt-run", str(small_model_dir), "--prompts-file", str(tmp_path / "p.jsonl"), "-n", "4")
    assert [json.loads(x)["prompt"] for x in r.stdout.decode().splitlines()] == prompts + ["line\nbreak"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": 3}\n')
    bad = run_cli("gpt-run", str(small_model_dir), "--prompts-file", str(tmp_path / "bad.jsonl"))
    assert bad.returncode == 1 and b"bad.jsonl:1" in bad.stderr


def test_gpt_run_prompts_file_reports_a_bad_prompt_and_generates_the_rest(tmp_path, small_model_dir, model):
    from conftest import run_cli

    prompts = ["first", "word " * 80, "third"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    r = run_cli("gpt-run", str(small_model_dir), "--prompts-file", str(tmp_path / "p.txt"), "-n", "5",
                "--ignore-eos", "--batch-size", "1")
    lines = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [x["index"] for x in lines] == [0, 1, 2]
    assert "context is 64" in lines[1]["error"] and lines[1]["stop_reason"] == "error"
    assert lines[2]["ids"] == model.complete("third", 5, stop_at_eos=False).ids
    assert r.returncode == 1 and b"1 of 3 prompts failed" in r.stderr and len(r.stderr.splitlines()) == 1


def test_gpt_run_flags_come_from_the_options(small_model_dir, model):
    from conftest import run_cli

    r = run_cli("gpt-run", str(small_model_dir), "the the", "-n", "6", "--ignore-eos", "--logit-bias", "42=100",
                "--logprobs", "2", "--frequency-penalty", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    expected = model.complete("the the", 6, stop_at_eos=False, logit_bias={42: 100}, logprobs=2,
                              frequency_penalty=0.5)
    assert out["ids"] == expected.ids == [42] * 6 and len(out["top_logprobs"]) == 6
    for args, fragment in ((["--logit-bias", "x=1"], "ID=BIAS"), (["--logit-bias", "1=500"], "-100 to 100"),
                           (["--presence-penalty", "9"], "--presence-penalty"), (["--logprobs", "30"], "--logprobs")):
        bad = run_cli("gpt-run", str(small_model_dir), "hi", *args)
        assert bad.returncode == 2 and fragment in bad.stderr.decode() and len(bad.stderr.splitlines()) == 1


def test_cli_score(small_model_dir, tmp_path):
    model = gpt2np.load(small_model_dir)
    text = "Scoring from a file, with ünïcode.\n"
    (tmp_path / "t.txt").write_text(text)
    s = model.score(text)
    r = run_cli("gpt-run", str(small_model_dir), "--score", str(tmp_path / "t.txt"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines() == [f"tokens: {len(s.ids)}", f"nll: {s.nll:.6f}",
                                              f"perplexity: {s.perplexity:.6f}"]
    j = run_cli("gpt-run", str(small_model_dir), "--score", "-", "--json", "--stride", "10", input=text.encode())
    out = json.loads(j.stdout)
    assert out["ids"] == s.ids and out["stride"] == 10 and out["window"] == 64
    np.testing.assert_allclose(out["logprobs"], s.logprobs, atol=1e-6)
