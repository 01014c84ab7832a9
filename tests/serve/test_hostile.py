"""`gpt-serve` against hostile and careless clients: huge one-piece prompts, maximal logit_bias,
stalled sockets, odd methods and media types, and a schemathesis run (every check, every phase)
against the served /openapi.json. Real server processes on loopback."""

from __future__ import annotations

import json
import os
import random
import socket
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import BIN
from helpers.serve_process import ServerProcess

MODEL = "small"
HOOKS = Path(__file__).parent / "schemathesis_hooks.py"
EXAMPLES = int(os.environ.get("GPT2NP_SCHEMATHESIS_EXAMPLES", "40"))  # per operation, fuzzing and stateful


@pytest.fixture(scope="module")
def server(small_model_dir):
    with ServerProcess(small_model_dir, "--model-name", MODEL, "--header-timeout", "1", "--body-timeout", "1") as s:
        yield s
        output = s.output()
    assert "Traceback" not in output, output


def _raw(url: str, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection; everything the server sends until it closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
        return b"".join(chunks)


# ---------------------------------------------------------------------------- long one-piece text
def test_a_4_mib_one_piece_prompt_is_refused_without_encoding_it(server, model):
    body = json.dumps({"model": MODEL, "prompt": "a" * (4 * 1024 * 1024 - 100)}).encode()
    started = time.perf_counter()
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                   timeout=120)
    took = time.perf_counter() - started
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "at least" in error["message"]
    assert took < 30  # hours with a quadratic merge; refused from the length alone here


def test_long_pieces_under_the_limits_are_encoded_exactly(server, model):
    rng = random.Random(0)
    rng_text = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=100_000))  # one piece, ~60,000 tokens
    r = httpx.post(server.url + "/tokenize", json={"prompt": rng_text}, timeout=120)
    assert r.status_code == 200 and r.json()["tokens"] == model.encode(rng_text)
    too_many = httpx.post(server.url + "/tokenize", json={"prompt": "a" * 4_000_000}, timeout=120)
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "prompt_too_long"
    # a prompt just within the context's length bound is encoded, then refused by its count
    ids = model.encode("abc" * 30)
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "abc" * 30, "max_tokens": 0})
    assert (r.status_code == 200) == (len(ids) <= 64), r.text


# ------------------------------------------------------------------------------------ logit_bias
def test_logit_bias_takes_at_most_300_entries(server):
    bias = {str(i): -1 for i in range(300)}
    ok = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2,
                                                          "logit_bias": bias})
    assert ok.status_code == 200, ok.text
    bias["300"] = -1
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "logit_bias": bias})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias" and "300" in r.json()["error"]["message"]


def _stream_gaps(url: str, n_tokens: int) -> list[float]:
    gaps, last = [], None
    with httpx.stream("POST", url + "/v1/completions", timeout=120,
                      json={"model": MODEL, "prompt": "Once", "max_tokens": n_tokens, "temperature": 0,
                            "ignore_eos": True, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
    return gaps


@pytest.fixture(scope="module")
def long_context_dir(tmp_path_factory):
    """The small model's shapes with a 1024-position context, so that streams run for a while."""
    from conftest import SMALL_HPARAMS, write_model_dir
    from helpers.make_checkpoint import random_openai_weights

    hp = {**SMALL_HPARAMS, "n_ctx": 1024}
    return write_model_dir(tmp_path_factory.mktemp("long") / "model", hp, random_openai_weights(hp, seed=2))


def test_a_maximal_logit_bias_beside_a_stream_leaves_its_token_gaps_alone(long_context_dir):
    """15 sequences with OpenAI's maximum of 300 biased tokens each, decoded in the same steps as
    another client's stream: its token gaps stay within 1.5x of those beside the same 15 sequences
    without a bias (rounds alternate; medians)."""
    biased = {str(i * 97 % 50257): -2.5 for i in range(300)}
    with ServerProcess(long_context_dir, "--model-name", MODEL, "--max-batch", "16") as s:
        def neighbour(bias):
            body = {"model": MODEL, "prompt": "Beside", "max_tokens": 250, "n": 15, "temperature": 0.7,
                    "ignore_eos": True, "seed": 1, **({"logit_bias": bias} if bias else {})}
            httpx.post(s.url + "/v1/completions", json=body, timeout=120).raise_for_status()

        medians = {"plain": [], "biased": []}
        for _ in range(3):
            for kind, bias in (("plain", None), ("biased", biased)):
                with ThreadPoolExecutor(1) as pool:
                    job = pool.submit(neighbour, bias)
                    time.sleep(0.2)  # the 15 sequences are decoding
                    gaps = _stream_gaps(s.url, 80)
                    job.result()
                medians[kind].append(statistics.median(gaps))
    plain, biased_gap = statistics.median(medians["plain"]), statistics.median(medians["biased"])
    print(medians)
    assert biased_gap <= 1.5 * plain, medians


# ------------------------------------------------------------------------------ stalled sockets
def test_stalled_headers_and_bodies_get_408_and_are_closed(server):
    started = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        nothing = pool.submit(_raw, server.url, b"")
        half_headers = pool.submit(_raw, server.url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        half_body = pool.submit(_raw, server.url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
        answers = [nothing.result(), half_headers.result(), half_body.result()]
    assert time.monotonic() - started < 4.5  # the 1 s timeouts, not the client's own 5 s
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"connection: close" in answer.lower()
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_slow_but_steady_request_is_served(server):
    """The header deadline runs per request: a keep-alive connection's next request gets its own."""
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/health").status_code == 200
        time.sleep(1.5)  # past the header timeout, within uvicorn's 5 s keep-alive
        assert c.get("/v1/models").status_code == 200


def test_connections_beyond_the_bound_get_503(small_model_dir):
    with ServerProcess(small_model_dir, "--model-name", MODEL, "--max-connections", "8",
                       "--header-timeout", "2") as s:
        host, port = s.url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port))) for _ in range(8)]
        for sock in held:
            sock.sendall(b"GET /health HTTP/1.1\r\n")  # and never the rest
        extra = _raw(s.url, b"")
        assert extra.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in extra.lower(), extra
        assert json.loads(extra.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_connections"
        for sock in held:  # each is closed at its header deadline
            sock.settimeout(5)
            assert sock.recv(65536).startswith(b"HTTP/1.1 408 ")
            sock.close()
        s.wait_for(lambda: httpx.get(s.url + "/health").status_code == 200, what="room again")
        assert "Traceback" not in s.output()


# -------------------------------------------------------------------------------- small points
def test_405_names_the_allowed_methods_and_get_routes_answer_head(server):
    r = httpx.delete(server.url + "/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["code"] == "method_not_allowed"
    assert "GET" in httpx.post(server.url + "/health").headers["allow"]
    for path in ("/health", "/v1/models", "/metrics", "/tokenizer_info"):
        head = httpx.head(server.url + path)
        assert head.status_code == 200 and head.content == b"", path
        assert head.headers["content-type"] == httpx.get(server.url + path).headers["content-type"]


def test_integer_valued_numbers_are_integers(server, model):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": [15496.0, 995], "max_tokens": 4.0,
                                                         "n": 2.0, "logprobs": 1.0, "top_k": 5.0, "seed": 3.0})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2 and r.json()["usage"]["completion_tokens"] == 8
    assert httpx.post(server.url + "/detokenize", json={"tokens": [15496.0]}).json() == {"prompt": "Hello"}
    for field, value in (("max_tokens", 4.5), ("n", True), ("seed", "3")):
        bad = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", field: value})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == field


def test_a_body_not_sent_as_json_gets_415(server):
    r = httpx.post(server.url + "/v1/completions", content=b"model=small&prompt=x",
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    ok = httpx.post(server.url + "/v1/completions", content=json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}),
                    headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200
    no_type = _raw(server.url, b'POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\nConnection: close\r\n\r\n'
                               b'{"prompt": "x"}')
    assert no_type.startswith(b"HTTP/1.1 200 ")  # a body without a Content-Type is read as JSON


@pytest.mark.parametrize("key_args,status", [((), 413), (("--api-key", "k"), 401)])
def test_a_broken_chunked_body_after_an_early_answer_logs_no_traceback(small_model_dir, key_args, status):
    """The server answers before it reads the body (too large, no key), then the rest of the body
    comes, broken: the answer said `connection: close`, and nothing is logged but the request."""
    with ServerProcess(small_model_dir, "--model-name", MODEL, *key_args) as s:
        host, port = s.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            length = 5 * 1024 * 1024 if status == 413 else 5
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % length + b"x" * length)
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
            assert b"connection: close" in answer.lower()
            try:
                sock.sendall(b"x" * 1000 + b"\r\nzz-not-a-chunk\r\n\r\n")
                sock.recv(65536)
            except OSError:
                pass  # closed already
        time.sleep(0.3)
        assert httpx.get(s.url + "/health").status_code == 200
        assert "Traceback" not in s.output() and "Exception" not in s.output(), s.output()


def test_a_non_ascii_api_key_matches(small_model_dir):
    key = "clé-🔑"
    with ServerProcess(small_model_dir, "--model-name", MODEL, "--api-key", key) as s:
        right = httpx.get(s.url + "/v1/models", headers={"Authorization": b"Bearer " + key.encode("utf-8")})
        assert right.status_code == 200, right.text
        wrong = httpx.get(s.url + "/v1/models", headers={"Authorization": b"Bearer " + "cle-🔑".encode("utf-8")})
        assert wrong.status_code == 401


# ---------------------------------------------------------------------------------- schemathesis
def test_openapi_states_what_the_server_does(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    ops = schema["paths"]
    assert "/v1/chat/completions" not in ops  # it exists only to refuse
    completion = ops["/v1/completions"]["post"]
    assert "422" not in completion["responses"]
    assert {"200", "400", "404", "408", "413", "415", "429", "500", "503"} <= set(completion["responses"])
    request = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    temperature = next(s for s in request["temperature"]["anyOf"] if s.get("type") == "number")
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)
    assert request["model"]["enum"] == [MODEL]
    tokenize = schema["components"]["schemas"]["TokenizeRequest"]
    assert tokenize["required"] == ["prompt"] and tokenize["properties"]["prompt"]["type"] == "string"


@pytest.mark.parametrize("key", [None, "st-kéy"])
def test_schemathesis_finds_nothing(small_model_dir, tmp_path, key):
    """Every check (the positive-data one replaced by a hook that also allows the rules across
    fields the schema names: `schemathesis_hooks.py`), in every phase: examples, coverage,
    fuzzing and stateful, against a real server; a bounded number of examples in CI."""
    st = BIN / "st"
    if not st.exists():
        pytest.skip("schemathesis is not installed (it is in the test extra)")
    args = ("--api-key", key) if key else ()
    (tmp_path / "schemathesis.toml").write_text(
        "request-timeout = 30\nworkers = 1\nseed = 7\n[cache]\nenabled = false\n"
        f"[generation]\nmax-examples = {EXAMPLES}\ndatabase = \"none\"\n")
    with ServerProcess(small_model_dir, "--model-name", MODEL, *args) as s:
        command = [str(st), "run", s.url + "/openapi.json", "--phases", "examples,coverage,fuzzing,stateful",
                   "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--output-sanitize", "false",
                   "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml")]
        if key:
            command += ["-H", f"Authorization: Bearer {key}"]
        run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                             env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS),
                                  "HYPOTHESIS_STORAGE_DIRECTORY": str(tmp_path / "hypothesis")})
        output = s.output()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "failure" not in run.stdout.split("SUMMARY")[-1].lower()
    junit = (tmp_path / "junit.xml").read_text()
    assert 'failures="0"' in junit and 'errors="0"' in junit
    assert "Traceback" not in output, output[-3000:]
