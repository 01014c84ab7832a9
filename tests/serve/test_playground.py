"""The playground page of gpt-serve, in a real browser (Debian's chromium, driven by Playwright)
against a real gpt-serve process; and the endpoints the page uses."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import BIN, ROOT
from helpers.serve_process import ServerProcess

MODEL = "small"
ARTIFACTS = ROOT / "test-artifacts"
PROMPT = "The history of the city"


@pytest.fixture(scope="module")
def server(small_model_dir):
    with ServerProcess(small_model_dir, "--model-name", MODEL, "--max-batch", "4") as s:
        yield s


def api(server, path: str = "/v1/completions", **body) -> dict:
    r = httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------- the endpoints


def test_the_page_and_its_files_are_served_from_the_package(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for src in re.findall(r'(?:src|href)="(/ui/[^"]+)"', page.text):
        r = httpx.get(server.url + src)
        assert r.status_code == 200 and r.text.strip(), src
    assert re.findall(r'(?:src|href)="(https?:[^"]+)"', page.text) == []  # nothing from elsewhere
    assert httpx.get(server.url + "/ui/nothing.js").status_code == 404
    assert "open http://" in server.output() and "/ in a browser" in server.output()


def test_config_states_the_servers_own_limits(server):
    from gpt2np.serve.protocol import MAX_LOGPROBS, MAX_STOP

    c = httpx.get(server.url + "/ui/api/config").json()
    assert c["model"] == MODEL and c["n_positions"] == 64 and c["max_logprobs"] == MAX_LOGPROBS
    assert c["weights"] == "float32"
    o = {x["name"]: x for x in c["options"]}
    assert set(o) == {"max_tokens", "temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty",
                      "seed", "stop", "n", "ignore_eos"}
    assert (o["max_tokens"]["minimum"], o["max_tokens"]["maximum"]) == (0, 64)
    assert (o["temperature"]["minimum"], o["temperature"]["maximum"]) == (0, 2)
    assert (o["top_p"]["exclusiveMinimum"], o["top_p"]["maximum"]) == (0, 1)
    assert o["n"]["maximum"] == 4 + 64  # --max-batch plus the default --max-queue
    assert o["stop"]["maxItems"] == MAX_STOP and o["stop"]["type"] == "list"
    assert o["ignore_eos"]["type"] == "boolean" and o["seed"]["type"] == "integer"
    assert all(x["help"] for x in c["options"])
    # the same bounds the server enforces: one past each is refused
    for name, bad in (("temperature", 2.01), ("max_tokens", 65), ("top_k", -2)):
        r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "a", name: bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == name


def test_tokens_are_named_as_the_apis_logprobs_name_them(server, model):
    names = httpx.get(server.url + "/ui/api/tokens").json()
    assert len(names) == model.config.vocab_size
    body = api(server, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=5)
    ids = api(server, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=5, return_tokens_as_token_ids=True)
    by_id, by_name = ids["choices"][0]["logprobs"], body["choices"][0]["logprobs"]
    assert [names[int(t.split(":")[1])] for t in by_id["tokens"]] == by_name["tokens"]
    for a, b in zip(by_id["top_logprobs"], by_name["top_logprobs"]):
        assert {names[int(k.split(":")[1])]: v for k, v in a.items()} == b
    assert names[50256] == "<|endoftext|>" and any(n.startswith("bytes:\\x") for n in names)


def test_return_tokens_as_token_ids_when_streaming_with_echo(server, model):
    prompt_ids = model.encode(PROMPT)
    events = []
    with httpx.stream("POST", server.url + "/v1/completions", json={
            "model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True, "echo": True,
            "logprobs": 2, "return_tokens_as_token_ids": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    echo = events[0]["choices"][0]["logprobs"]
    assert echo["tokens"] == [f"token_id:{i}" for i in prompt_ids]
    generated = [e["choices"][0]["logprobs"]["tokens"][0] for e in events[1:] if e["choices"][0]["logprobs"]]
    greedy = model.complete(PROMPT, 5, stop_at_eos=True)
    assert generated == [f"token_id:{i}" for i in greedy.ids]


def test_no_ui_leaves_the_page_out(small_model_dir):
    with ServerProcess(small_model_dir, "--no-ui") as s:
        assert httpx.get(s.url + "/").status_code == 404
        assert httpx.get(s.url + "/ui/api/config").status_code == 404
        assert httpx.get(s.url + "/ui/playground.js").status_code == 404
        assert "the playground" not in s.output()


def test_explain_endpoint_is_bounded_and_keyed(small_model_dir):
    with ServerProcess(small_model_dir, "--model-name", MODEL, "--api-key", "k3y") as s:
        assert httpx.get(s.url + "/").status_code == 200  # the page itself asks for the key
        assert httpx.get(s.url + "/ui/api/config").status_code == 401
        auth = {"Authorization": "Bearer k3y"}
        assert httpx.post(s.url + "/ui/api/explain", json={"prompt": "Hi"}).status_code == 401
        r = httpx.post(s.url + "/ui/api/explain", json={"prompt": "Hello there, city"}, headers=auth, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "Hello there, city" in r.text
        long = httpx.post(s.url + "/ui/api/explain", json={"prompt": "word " * 100}, headers=auth)
        assert long.status_code == 400 and long.json()["error"]["code"] == "prompt_too_long"
        assert "at most 64 tokens" in long.json()["error"]["message"]
        bad = httpx.post(s.url + "/ui/api/explain", json={"prompt": 5}, headers=auth)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


def test_gpt_run_ids_takes_a_prompt_as_token_ids(server, small_model_dir, model):
    ids = model.encode(PROMPT) + [50256, 11]
    out = subprocess.run([str(BIN / "gpt-run"), str(small_model_dir), ",".join(map(str, ids)), "--ids", "-n", "8"],
                         capture_output=True, text=True, check=True).stdout
    assert out == api(server, prompt=ids, max_tokens=8, temperature=0)["choices"][0]["text"]
    bad = subprocess.run([str(BIN / "gpt-run"), str(small_model_dir), "1,x", "--ids"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--ids" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------------------- in a browser

playwright_api = pytest.importorskip("playwright.sync_api")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
    return found


@pytest.fixture(scope="module")
def browser():
    pw = playwright_api.sync_playwright().start()
    b = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
    try:
        yield b
    finally:
        b.close()
        pw.stop()


class Watch:
    """A page's console errors, uncaught exceptions and every URL it requested."""

    def __init__(self, page):
        self.errors, self.urls = [], []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", lambda r: self.urls.append(r.url))

    def check(self, origin: str, statuses: tuple[int, ...] = ()) -> None:
        # Chromium itself logs each response with an error status that a test asked for on purpose
        expected = [e for e in self.errors if any(f"status of {code} " in e for code in statuses)]
        assert [e for e in self.errors if e not in expected] == []
        strays = [u for u in self.urls if not (u.startswith(origin + "/") or u.startswith(("blob:", "data:", "about:")))]
        assert strays == [], "requests that left the server"


@pytest.fixture
def open_page(browser):
    made = []

    def open_(server, viewport=(1280, 900), scheme="light", key=None, statuses=()):
        ctx = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]}, color_scheme=scheme)
        ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        page = ctx.new_page()
        watch = Watch(page)
        made.append((ctx, watch, server.url, statuses))
        page.goto(server.url + "/")
        if key is None:
            page.wait_for_selector("[data-testid=option-max_tokens]")
        return page

    yield open_
    try:
        for ctx, watch, origin, statuses in made:
            watch.check(origin, statuses)
    finally:
        for ctx, *_ in made:
            ctx.close()


def set_options(page, **options) -> None:
    for name, value in options.items():
        field = page.get_by_test_id(f"option-{name}")
        if isinstance(value, bool):
            field.set_checked(value)
        else:
            field.fill("\n".join(value) if isinstance(value, list) else str(value))


def generate(page, prompt: str | None = None, **options) -> None:
    if prompt is not None:
        page.get_by_test_id("prompt").fill(prompt)
    set_options(page, **options)
    page.get_by_test_id("generate").click()
    wait_done(page)


def wait_done(page) -> None:
    page.wait_for_function("document.querySelector('[data-testid=generate]').disabled === false"
                           " && /finished|stopped/.test(document.querySelector('[data-testid=stats]').textContent)"
                           " || !document.querySelector('[data-testid=error]').hidden", timeout=60_000)


def generated(page) -> list[dict]:
    return page.eval_on_selector_all("[data-testid=token]", "els => els.map(e => ({text: e.dataset.text, "
                                     "p: Number(e.dataset.p), id: Number(e.dataset.id)}))")


def test_greedy_text_in_the_page_equals_the_apis(server, open_page, model):
    page = open_page(server)
    generate(page, PROMPT, max_tokens=12, temperature=0, seed=3)
    tokens = generated(page)
    body = api(server, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1)["choices"][0]
    assert "".join(t["text"] for t in tokens) == body["text"] != ""
    assert page.get_by_test_id("output").inner_text().endswith(body["text"])
    for t, lp in zip(tokens, body["logprobs"]["token_logprobs"]):
        assert math.isclose(t["p"], math.exp(lp), rel_tol=1e-5)
    # the prompt's tokens, each with its surprisal (the first has none)
    prompt_tokens = page.eval_on_selector_all("[data-testid=prompt-token]", "els => els.map(e => e.dataset.surprisal)")
    assert len(prompt_tokens) == len(model.encode(PROMPT)) and prompt_tokens[0] is None
    assert all(float(s) >= 0 for s in prompt_tokens[1:])
    stats = page.get_by_test_id("stats").inner_text()
    assert f"prompt {len(prompt_tokens)} tokens" in stats and f"{len(tokens)} generated" in stats
    assert "first token" in stats and "tokens/s" in stats and "from the prefix cache" in stats


def test_alternatives_are_the_apis_top_logprobs(server, open_page):
    page = open_page(server)
    generate(page, PROMPT, max_tokens=6, temperature=0)
    body = api(server, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=5)["choices"][0]["logprobs"]
    for k in (0, 3):
        page.get_by_test_id("token").nth(k).hover()
        panel = page.get_by_test_id("alternatives")
        panel.wait_for(state="visible")
        alts = panel.get_by_test_id("alternative")
        shown = {alts.nth(i).get_attribute("data-text"): float(alts.nth(i).get_attribute("data-p"))
                 for i in range(alts.count())}
        expected = {name: math.exp(lp) for name, lp in body["top_logprobs"][k].items()}
        assert shown.keys() == expected.keys()
        for name in shown:
            assert math.isclose(shown[name], expected[name], rel_tol=1e-5)


def test_choosing_an_alternative_goes_on_from_there(server, open_page):
    page = open_page(server)
    generate(page, PROMPT, max_tokens=8, temperature=0)
    before = api(server, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=5, echo=True,
                 return_tokens_as_token_ids=True)["choices"][0]["logprobs"]
    ids = [int(t.split(":")[1]) for t in before["tokens"]]
    n_prompt = len(ids) - 8
    k = 2
    page.get_by_test_id("token").nth(k).hover()
    alt = page.get_by_test_id("alternative").nth(1)  # the second most likely: not the chosen one
    alt_id = int(alt.get_attribute("data-id"))
    assert alt_id != ids[n_prompt + k]
    alt.click()
    wait_done(page)
    prefix = ids[:n_prompt + k] + [alt_id]
    expected = api(server, prompt=prefix, max_tokens=8, temperature=0)["choices"][0]["text"]
    assert "".join(t["text"] for t in generated(page)) == expected
    shown = page.eval_on_selector_all("[data-testid=prompt-token]", "els => els.map(e => Number(e.dataset.id))")
    assert shown == prefix
    assert page.get_by_test_id("branch-note").is_visible()


def test_stop_ends_the_request_and_frees_its_sequence(model_124M_dir, open_page):
    with ServerProcess(model_124M_dir, "--model-name", MODEL) as s:
        page = open_page(s)
        page.get_by_test_id("prompt").fill(PROMPT)
        set_options(page, max_tokens=900, temperature=0, ignore_eos=True)
        page.get_by_test_id("prompt").press("Control+Enter")  # by keyboard
        page.wait_for_function("document.querySelectorAll('[data-testid=token]').length >= 3", timeout=60_000)
        assert s.metric("gpt2np_requests_running") == 1
        page.keyboard.press("Escape")
        wait_done(page)
        s.wait_for(lambda: s.metric("gpt2np_requests_running") == 0, timeout=5, what="the sequence to leave the batch")
        assert "stopped" in page.get_by_test_id("stats").inner_text()
        assert len(generated(page)) < 900 and page.get_by_test_id("error").is_hidden()


def test_an_invalid_schema_shows_the_servers_message_by_the_field(server, open_page):
    page = open_page(server, statuses=(400,))
    page.get_by_test_id("constraint-kind").select_option("json_schema")
    schema = '{"type": "object", "properties": {"a": {"type": "strnig"}}}'
    page.get_by_test_id("constraint").fill(schema)
    generate(page, PROMPT, max_tokens=8, temperature=0)
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 8,
                                                          "temperature": 0, "structured_outputs": {"json": schema}})
    assert r.status_code == 400
    error = page.get_by_test_id("error")
    assert error.is_visible() and error.inner_text() == r.json()["error"]["message"]
    # shown by the constraint's editor, which is marked invalid (no alert box)
    assert page.evaluate("document.querySelector('[data-testid=error]').previousElementSibling.id") == "constraint"
    assert page.get_by_test_id("constraint").get_attribute("aria-invalid") == "true"


def test_a_regex_constraint_holds_in_the_page(server, open_page):
    page = open_page(server)
    page.get_by_test_id("constraint-kind").select_option("regex")
    page.get_by_test_id("constraint").fill("[0-9]{3}-[a-z]{2}")
    generate(page, PROMPT, max_tokens=20, temperature=1, seed=5)
    text = "".join(t["text"] for t in generated(page))
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", text)


def copied(page, kind: str) -> str:
    page.get_by_test_id(f"copy-{kind}").click()
    text = page.get_by_test_id("copied").inner_text()
    assert page.evaluate("navigator.clipboard.readText()") == text
    return text


def test_copy_as_curl_python_and_gpt_run_reproduce_the_text(server, open_page, tmp_path):
    page = open_page(server)
    generate(page, PROMPT + " 'quoted'", max_tokens=10, temperature=0.9, seed=11, top_k=40,
             stop=["zzz"], presence_penalty=0.5)
    text = "".join(t["text"] for t in generated(page))
    assert text
    curl = copied(page, "curl")
    out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, check=True, timeout=60).stdout
    assert json.loads(out)["choices"][0]["text"] == text
    script = tmp_path / "snippet.py"
    script.write_text(copied(page, "python"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out == text
    line = copied(page, "gpt-run")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, check=True, timeout=60, env=env).stdout
    assert out == text


def test_copy_as_gpt_run_after_a_branch_and_with_a_constraint(server, open_page):
    page = open_page(server)
    page.get_by_test_id("constraint-kind").select_option("choice")
    page.get_by_test_id("constraint").fill("red\ngreen\nblue")
    generate(page, PROMPT, max_tokens=8, temperature=0.7, seed=2)
    assert "".join(t["text"] for t in generated(page)) in ("red", "green", "blue")
    page.get_by_test_id("constraint-kind").select_option("none")
    generate(page, PROMPT, max_tokens=6, temperature=0)
    page.get_by_test_id("token").nth(1).hover()
    page.get_by_test_id("alternative").nth(2).click()
    wait_done(page)
    text = "".join(t["text"] for t in generated(page))
    line = copied(page, "gpt-run")
    assert "--ids" in line
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    assert subprocess.run(["bash", "-c", line], capture_output=True, text=True, check=True, env=env).stdout == text


def test_explain_opens_gpt_explains_page_for_the_text(server, open_page):
    page = open_page(server)
    generate(page, PROMPT, max_tokens=5, temperature=0)
    with page.context.expect_page() as popup:
        page.get_by_test_id("explain").click()
    report = popup.value
    report.wait_for_url(re.compile("^blob:"), timeout=60_000)
    report.wait_for_function("document.body && document.body.dataset.ready === 'yes'", timeout=60_000)
    text = "".join(page.eval_on_selector_all("[data-testid=prompt-token], [data-testid=token]",
                                             "els => els.map(e => e.dataset.text)"))
    assert text.startswith(PROMPT) and PROMPT in report.content()


def test_api_key_is_typed_in_the_page_and_kept_for_the_tab(small_model_dir, open_page):
    with ServerProcess(small_model_dir, "--model-name", MODEL, "--api-key", "s3cret") as s:
        page = open_page(s, key="s3cret", statuses=(401,))
        page.get_by_test_id("api-key").wait_for(state="visible")
        page.get_by_test_id("api-key").fill("wrong")
        page.get_by_test_id("api-key").press("Enter")
        page.get_by_test_id("error").wait_for(state="visible")
        assert "key" in page.get_by_test_id("error").inner_text().lower()
        page.get_by_test_id("api-key").fill("s3cret")
        page.get_by_test_id("api-key").press("Enter")
        page.wait_for_selector("[data-testid=option-max_tokens]")
        generate(page, PROMPT, max_tokens=4, temperature=0)
        assert len(generated(page)) == 4
        assert page.evaluate("sessionStorage.getItem('gpt2np-api-key')") == "s3cret"
        assert page.evaluate("localStorage.length") == 0


def test_keyboard_alone_reaches_tokens_and_alternatives(server, open_page):
    page = open_page(server)
    page.get_by_test_id("prompt").fill(PROMPT)
    set_options(page, max_tokens=5, temperature=0)
    page.get_by_test_id("prompt").focus()
    page.keyboard.press("Control+Enter")
    wait_done(page)
    first = page.get_by_test_id("token").first
    first.focus()
    assert page.get_by_test_id("alternatives").is_visible()
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.dataset.testid") == "alternative"


def test_every_control_has_a_label(server, open_page):
    page = open_page(server)
    unlabeled = page.evaluate("""[...document.querySelectorAll('input, select, textarea, button')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.id || e.dataset.testid)""")
    assert unlabeled == []


@pytest.mark.parametrize("name, viewport, scheme", [("desktop", (1280, 900), "light"), ("phone", (375, 812), "dark")])
def test_desktop_and_phone_width_light_and_dark(server, open_page, name, viewport, scheme):
    page = open_page(server, viewport=viewport, scheme=scheme)
    generate(page, PROMPT, max_tokens=10, temperature=0)
    page.get_by_test_id("token").nth(2).hover()
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport[0]  # nothing wider than the screen
    for testid in ("prompt", "generate", "stop", "output", "stats"):
        box = page.get_by_test_id(testid).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= viewport[0], testid
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert (background == "rgb(255, 255, 255)") == (scheme == "light")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"playground-{name}.png"), full_page=True)
    assert (ARTIFACTS / f"playground-{name}.png").stat().st_size > 10_000


def test_n_completions_each_equal_the_apis(server, open_page):
    page = open_page(server)
    assert page.get_by_role("tab").count() == 0  # one completion: no tabs
    generate(page, PROMPT, max_tokens=6, temperature=0.8, seed=21, n=2)
    body = api(server, prompt=PROMPT, max_tokens=6, temperature=0.8, seed=21, n=2)
    texts = [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]
    tabs = page.get_by_role("tab")
    assert tabs.count() == 2
    shown = []
    for i in range(2):
        tabs.nth(i).click()
        shown.append("".join(t["text"] for t in generated(page)))
    assert shown == texts and texts[0] != texts[1]


def test_the_options_limits_come_from_the_server(server, open_page):
    page = open_page(server)
    config = httpx.get(server.url + "/ui/api/config").json()
    for o in config["options"]:
        field = page.get_by_test_id(f"option-{o['name']}")
        assert field.count() == 1, o["name"]
        if "maximum" in o and o["type"] in ("integer", "number"):
            assert float(field.get_attribute("max")) == o["maximum"]
            assert float(field.get_attribute("min")) == o.get("minimum", o.get("exclusiveMinimum"))
    assert page.get_by_test_id("option-max_tokens").get_attribute("max") == "64"  # this model's context
