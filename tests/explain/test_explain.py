"""`gpt-explain`: the report's facts, the command as a user runs it, and the page in a real
headless browser (Debian's chromium)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import gpt2np
from gpt2np.inside import page, report
from conftest import ROOT, run_cli

ARTIFACTS = Path(os.environ.get("GPT2NP_TEST_ARTIFACTS", ROOT / "test-artifacts"))
PROMPT = "Alan Turing theorized that computers would one day become"


@pytest.fixture(scope="module")
def small(small_model_dir):
    return gpt2np.load(small_model_dir)


def test_report_holds_what_the_page_shows(small):
    r = report(small, PROMPT, 6)
    ids = small.encode(PROMPT)
    assert [i for p in r["pieces"] for i in p["ids"]] == ids == r["prompt_ids"]
    assert [p["text"] for p in r["pieces"]] == small.tokenizer.split(PROMPT)
    g = small.complete(PROMPT, 6)
    assert [x["id"] for x in r["generated"]] == g.ids  # greedy: the same tokens as gpt-run
    for x, lp in zip(r["generated"], g.logprobs):
        assert x["p"] == pytest.approx(np.exp(lp)) and len(x["alternatives"]) == 5
        assert x["alternatives"][0][2] >= x["p"] - 1e-9  # greedy chose the most likely
    T = len(ids) + len(g.ids) - 1
    assert len(r["tokens"]) == T
    c = small.config
    att = np.frombuffer(base64.b64decode(r["attention"]), np.uint8)
    assert att.size == c.n_layer * c.n_head * T * (T + 1) // 2
    # the bytes are the trace's probabilities: each row of the lower triangle sums to about 255
    t = small.trace(ids + g.ids[:-1])
    first_head = att[:T * (T + 1) // 2]
    rows = np.split(first_head, np.cumsum(np.arange(1, T)))
    assert all(abs(int(row.sum()) - 255) <= len(row) for row in rows)
    np.testing.assert_allclose(rows[-1] / 255, t.attentions[0, 0, -1], atol=0.5 / 255 + 1e-6)
    assert len(r["lens"]) == c.n_layer + 1 and all(len(layer) == T for layer in r["lens"])
    assert [row[0] for row in r["lens"][-1]] == [small.tokenizer.id_to_token[int(i)] for i in np.argmax(t.logits, -1)]
    assert dict((s[0], s[1]) for s in r["shapes"])["logits = ln_f(x) @ wteᵀ"] == [T, c.vocab_size]


def test_the_page_is_self_contained_and_escapes_the_prompt(small):
    html = page.render(report(small, "</script><script>alert(1)</script> <!-- & \"'", 2))
    assert html.count("<script") == 3  # the error hook, the data, the code: the prompt opened none
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing from the network
    data = re.search(r'<script type="application/json" id="report">(.*?)</script>', html, re.S).group(1)
    assert json.loads(data)["prompt"].startswith("</script>")


def test_gpt_explain_writes_the_page(tmp_path, small_model_dir):
    out = tmp_path / "page.html"
    proc = run_cli("gpt-explain", str(small_model_dir), PROMPT, "-n", "4", "-o", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.read_text().startswith("<!DOCTYPE html>") and b"wrote" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]  # no temporary file left
    stdin = run_cli("gpt-explain", str(small_model_dir), "-", "-n", "4", "-o", "-", input=PROMPT.encode())
    assert stdin.returncode == 0 and stdin.stdout.decode() == out.read_text()  # greedy: the same page
    sampled = run_cli("gpt-explain", str(small_model_dir), PROMPT, "-n", "4", "--temperature", "0.9", "--seed", "3",
                      "-o", "-")
    assert sampled.returncode == 0 and b"temperature=0.9" in sampled.stdout


@pytest.mark.parametrize("args, message", [
    (["-n", "60"], "at most 64"),
    (["--top-p", "2"], "top-p"),
    (["-o", "/nonexistent/dir/page.html"], "does not exist"),
])
def test_gpt_explain_errors_are_one_line_and_keep_the_old_page(tmp_path, small_model_dir, args, message):
    out = tmp_path / "page.html"
    out.write_text("the old page")
    proc = run_cli("gpt-explain", str(small_model_dir), PROMPT, *(args if "-o" in args else [*args, "-o", str(out)]))
    err = proc.stderr.decode()
    assert proc.returncode in (1, 2) and message in err and len(err.strip().splitlines()) == 1, err
    assert out.read_text() == "the old page" and len(list(tmp_path.iterdir())) == 1


def test_gpt_explain_on_a_missing_model_is_one_line(tmp_path):
    proc = run_cli("gpt-explain", str(tmp_path / "nope"), "Hi")
    assert proc.returncode == 1 and len(proc.stderr.decode().strip().splitlines()) == 1


# ------------------------------------------------------------------------------ in a real browser
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
    return found


def browse(html_file: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
                           f"--user-data-dir={html_file.parent / 'chromium-profile'}", *args, html_file.as_uri()],
                          capture_output=True, text=True, timeout=180)


def test_the_page_in_a_headless_browser(tmp_path, model_124M_dir):
    """A 64-token prompt on 124M: small, loads with no console errors, one heatmap per layer and
    head, one logit-lens row per token; the screenshot goes to the test artifacts."""
    model = gpt2np.load(model_124M_dir)
    prompt = model.decode(model.encode(" ".join(["The history of the city begins with a river."] * 8))[:64])
    assert len(model.encode(prompt)) == 64
    html = page.render(report(model, prompt, 8))
    path = tmp_path / "explain.html"
    path.write_text(html, encoding="utf-8")
    assert len(html.encode()) < 3e6, f"{len(html.encode()) / 1e6:.1f} MB"
    T = 64 + 8 - 1
    dom = browse(path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    assert 'data-ready="yes"' in body and "data-error" not in body, body
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    assert len(re.findall(r'<canvas class="head[^"]*" data-layer="\d+" data-head="\d+"', dom.stdout)) == 12 * 12
    assert len(re.findall(r'<tr class="lensrow">', dom.stdout)) == T
    pieces = re.search(r'<tbody id="pieces">(.*?)</tbody>', dom.stdout, re.S).group(1)
    assert pieces.count("<tr>") == len(model.tokenizer.split(prompt))
    assert re.search(r'<tbody id="generation">(.*?)</tbody>', dom.stdout, re.S).group(1).count("<tr>") == 8
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "gpt-explain.png"
    shot.unlink(missing_ok=True)
    taken = browse(path, f"--screenshot={shot}", "--window-size=1280,3000", "--hide-scrollbars")
    assert taken.returncode == 0 and shot.stat().st_size > 20_000, taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.copy(path, ARTIFACTS / "gpt-explain.html")


def test_generated_text_is_what_gpt_run_prints(small):
    tok = small.tokenizer
    emoji = tok.encode("🙂")  # one character, several tokens: no token alone decodes to it
    assert len(emoji) > 1
    bias = {i: 100 - n for n, i in enumerate(emoji)}
    r = report(small, "hi", len(emoji), logit_bias=bias, presence_penalty=2.0)
    g = small.complete("hi", len(emoji), logit_bias=bias, presence_penalty=2.0)
    assert "".join(x["text"] for x in r["generated"]) == g.text == r["text"]
    assert "\ufffd" not in r["text"] or "\ufffd" in tok.decode(g.ids)
    stopped = small.complete(PROMPT, 8)
    stop = stopped.text[2:5]
    r = report(small, PROMPT, 8, stop=(stop,))
    assert r["text"] == small.complete(PROMPT, 8, stop=[stop]).text and stop not in r["text"]


def test_empty_prompt_and_invalid_unicode(small):
    html = page.render(report(small, "", 2))
    assert "The prompt is empty" in html
    text = "a\udcffb"  # how Python hands over an undecodable byte in argv
    assert [i for p in small.tokenizer.explain(text) for i in p.ids] == small.encode(text)


def test_writing_over_a_folder_is_one_line(tmp_path, small_model_dir):
    (tmp_path / "page.html").mkdir()
    proc = run_cli("gpt-explain", str(small_model_dir), PROMPT, "-n", "2", "-o", str(tmp_path / "page.html"))
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "cannot write" in err and str(tmp_path / "page.html") in err, err
    assert len(err.strip().splitlines()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]
