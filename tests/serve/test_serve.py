"""`gpt-serve` as deployed: a real server process on loopback, driven by the official `openai`
client (and raw HTTP where a request must be malformed)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

import gpt2np
from conftest import run_cli
from helpers.sampling_reference import log_softmax
from helpers.serve_process import ServerProcess

MODEL = "small"


@pytest.fixture(scope="module")
def server(small_model_dir):
    # A small batch and chunk so that requests queue, join, leave and read prompts in chunks.
    with ServerProcess(small_model_dir, "--model-name", MODEL, "--max-batch", "6", "--prefill-chunk", "8") as s:
        yield s
        output = s.output()
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def complete(client, **kw):
    kw.setdefault("model", MODEL)
    return client.completions.create(**kw)


def streamed(client, **kw):
    """(joined text per choice, finish_reason per choice, chunks) of a streamed request."""
    kw.setdefault("model", MODEL)
    texts, finish, chunks = {}, {}, []
    for chunk in client.completions.create(stream=True, **kw):
        chunks.append(chunk)
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, chunks


def test_import_gpt2np_never_imports_the_extras_libraries():
    code = ("import sys, gpt2np, gpt2np.serve; m = gpt2np.load; "
            "print(sorted(x for x in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client', 'pydantic', 'ray') "
            "if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------ endpoints
def test_models_health_tokenize_detokenize(server, client, model):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    text = "Hello world <|endoftext|> ☃"
    r = httpx.post(server.url + "/tokenize", json={"prompt": text}).json()
    assert r["tokens"] == model.encode(text, allowed_special=True) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 64 and 50256 in r["tokens"]
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}


def test_vllms_tokenizer_endpoints_and_model_card(server, client, model):
    """What lm-evaluation-harness's remote tokenizer (made for vLLM) reads: /tokenizer_info, then
    /tokenize with vLLM's fields, /detokenize; and vLLM's model card with the context length."""
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["tokenizer_class"] == "GPT2TokenizerFast" and info["model_max_length"] == 64
    assert info["eos_token"] == info["bos_token"] == "<|endoftext|>" and info["pad_token"] is None
    assert "chat_template" not in info  # GPT-2 has none
    text = "Hello world<|endoftext|> ☃"
    r = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False,
                                                   "return_token_strs": True}).json()
    assert r["tokens"] == model.encode(text, allowed_special=True) and r["count"] == len(r["tokens"])
    assert r["token_strs"][:3] == ["Hello", "Ġworld", "<|endoftext|>"]  # the vocabulary's strings, as vLLM's
    assert len(r["token_strs"]) == r["count"] and r["max_model_len"] == 64
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x"}).json()["token_strs"] is None
    assert httpx.post(server.url + "/tokenize", json={"prompt": info["eos_token"]}).json()["tokens"] == [50256]
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and "no chat template" in chat.json()["error"]["message"]
    assert chat.json()["error"]["param"] == "messages"
    assert httpx.post(server.url + "/tokenize", json={}).status_code == 400
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"], "model": MODEL}).json() == {
        "prompt": text}
    card = client.models.retrieve(MODEL).model_dump()
    assert card["max_model_len"] == 64 and card["root"] == MODEL and card["parent"] is None
    assert card["permission"][0]["object"] == "model_permission" and card["permission"][0]["allow_logprobs"]
    assert client.models.list().data[0].model_dump() == card


def test_a_tokens_logprob_is_one_float_everywhere_in_a_response(client, model):
    """The chosen token's `token_logprobs` entry and its entry in `top_logprobs` are the same float,
    and a greedy token's is the largest there (lm-evaluation-harness's `is_greedy` compares them
    with ==). Prompt positions (echo) and generated ones alike, over many texts."""
    rng = np.random.default_rng(4)
    greedy_seen = 0
    for trial in range(12):
        ids = [int(i) for i in rng.integers(0, 50257, size=int(rng.integers(2, 30)))]
        r = complete(client, prompt=ids, max_tokens=3, temperature=0, logprobs=int(rng.integers(1, 6)), echo=True,
                     extra_body={"ignore_eos": True})
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + 3
        for k in range(1, len(lp.tokens)):
            top = lp.top_logprobs[k]
            assert top[lp.tokens[k]] == lp.token_logprobs[k]  # one number for one fact
            greedy = lp.token_logprobs[k] == max(top.values())
            if k >= len(ids):  # generated greedily: always the largest
                assert greedy
            greedy_seen += greedy
    assert greedy_seen >= 12 * 3


def test_greedy_request_gives_gpt_runs_text(server, client, small_model_dir):
    prompt = "The answer to the question is"
    r = complete(client, prompt=prompt, max_tokens=20, temperature=0)
    cli = run_cli("gpt-run", str(small_model_dir), prompt, "-n", "20")
    assert cli.returncode == 0
    assert r.choices[0].text == cli.stdout.decode()
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    assert r.created <= time.time() + 1


def test_openai_defaults_temperature_1_and_16_tokens(client, model):
    r = complete(client, prompt="Defaults", seed=5, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
    sampled = model.complete("Defaults", 16, temperature=1.0, seed=5, stop_at_eos=False)
    assert r.choices[0].text == sampled.text
    assert r.usage.prompt_tokens == len(sampled.prompt_ids) and r.usage.total_tokens == 16 + len(sampled.prompt_ids)


def test_prompt_forms_and_n(client, model):
    ids = model.encode("token ids")
    for prompt, n_prompts in (("one", 1), (["a", "b c"], 2), (ids, 1), ([ids, [1, 2, 3]], 2)):
        r = complete(client, prompt=prompt, max_tokens=3, n=2, temperature=0, extra_body={"ignore_eos": True})
        assert [c.index for c in r.choices] == list(range(2 * n_prompts))
        assert r.usage.completion_tokens == 6 * n_prompts
    r = complete(client, prompt=[ids, [1, 2, 3]], max_tokens=4, temperature=0)
    assert r.choices[0].text == model.complete(ids, 4).text and r.choices[1].text == model.complete([1, 2, 3], 4).text
    assert r.usage.prompt_tokens == len(ids) + 3


def test_sampling_fields_follow_the_python_api(client, model):
    opts = dict(temperature=0.8, top_p=0.9, seed=11)
    r = complete(client, prompt="Sampling", max_tokens=12, n=3, extra_body={"top_k": 40, "ignore_eos": True}, **opts)
    for j, c in enumerate(r.choices):  # sample j is seeded with seed + j
        expected = model.complete("Sampling", 12, top_k=40, stop_at_eos=False, **{**opts, "seed": 11 + j})
        assert c.text == expected.text
    assert len({c.text for c in r.choices}) > 1
    again = complete(client, prompt="Sampling", max_tokens=12, n=3, extra_body={"top_k": 40, "ignore_eos": True}, **opts)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_penalties_and_logit_bias_follow_the_python_api(client, model):
    kw = dict(presence_penalty=0.5, frequency_penalty=1.5, logit_bias={"13": 5, "11": -100})
    r = complete(client, prompt="the the the", max_tokens=15, temperature=0, extra_body={"ignore_eos": True}, **kw)
    expected = model.complete("the the the", 15, stop_at_eos=False, presence_penalty=0.5, frequency_penalty=1.5,
                              logit_bias={13: 5, 11: -100})
    assert r.choices[0].text == expected.text
    assert r.choices[0].text != complete(client, prompt="the the the", max_tokens=15, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
    assert complete(client, prompt="x", max_tokens=3, user="someone", temperature=0).choices[0].text is not None


def test_stop_strings(client, model):
    full = model.complete("Once upon a time", 30, stop_at_eos=False).text
    stop = full[8:11]
    for given in (stop, [stop, "never appears"]):
        r = complete(client, prompt="Once upon a time", max_tokens=30, temperature=0, stop=given,
                     extra_body={"ignore_eos": True})
        assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
        texts, finish, _ = streamed(client, prompt="Once upon a time", max_tokens=30, temperature=0, stop=given,
                                    extra_body={"ignore_eos": True})
        assert texts[0] == r.choices[0].text and finish[0] == "stop"


def test_finish_reasons_are_openais(client, model):
    r = complete(client, prompt="x" * 10, max_tokens=64 - len(model.encode("x" * 10)), temperature=0,
                 extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"  # the context is full: "length" as well
    forced = complete(client, prompt="x", max_tokens=5, temperature=0, logit_bias={"50256": 100})
    assert forced.choices[0].finish_reason == "stop" and forced.choices[0].text == ""
    assert forced.usage.completion_tokens == 1  # <|endoftext|> counts, and is never text


def test_logprobs(client, model):
    r = complete(client, prompt="Log probabilities", max_tokens=6, temperature=0, logprobs=3,
                 extra_body={"ignore_eos": True})
    c = r.choices[0]
    g = model.complete("Log probabilities", 6, stop_at_eos=False)
    lp = log_softmax(model.logits(g.prompt_ids + g.ids))
    n = len(g.prompt_ids)
    assert c.logprobs.tokens == [model.decode([t]) for t in g.ids]
    np.testing.assert_allclose(c.logprobs.token_logprobs, [lp[n - 1 + i, t] for i, t in enumerate(g.ids)], atol=1e-4)
    for i, top in enumerate(c.logprobs.top_logprobs):
        best = np.argsort(-lp[n - 1 + i], kind="stable")[:3]
        assert set(top) == {model.decode([t]) for t in best}  # greedy: the chosen token is among them
    prompt_chars = len("Log probabilities")
    assert c.logprobs.text_offset == [prompt_chars + len(model.decode(g.ids[:i])) for i in range(6)]
    zero = complete(client, prompt="Log probabilities", max_tokens=2, temperature=0, logprobs=0)
    assert all(len(t) == 1 for t in zero.choices[0].logprobs.top_logprobs)  # just the chosen token


def test_echo_logprobs_equal_the_models_logits(client, model):
    text = "Scoring a text: echo with max_tokens 0 and logprobs gives every token's log-probability."
    r = complete(client, prompt=text, max_tokens=0, echo=True, logprobs=2)
    c = r.choices[0]
    ids = model.encode(text)
    lp = log_softmax(model.logits(ids))
    assert c.text == text and c.finish_reason == "length" and r.usage.completion_tokens == 0
    assert c.logprobs.tokens == [model.decode([t]) for t in ids]
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    np.testing.assert_allclose(c.logprobs.token_logprobs[1:], [lp[j, ids[j + 1]] for j in range(len(ids) - 1)],
                               atol=1e-4)
    assert c.logprobs.text_offset == [len(model.decode(ids[:i])) for i in range(len(ids))]
    # echo and generation: the prompt, then the completion, in text and in logprobs
    g = complete(client, prompt=text[:20], max_tokens=4, echo=True, logprobs=1, temperature=0,
                 extra_body={"ignore_eos": True}).choices[0]
    alone = model.complete(text[:20], 4, stop_at_eos=False)
    assert g.text == text[:20] + alone.text and len(g.logprobs.tokens) == len(alone.prompt_ids) + 4
    echo_only = complete(client, prompt="just echo", max_tokens=0, echo=True).choices[0]
    assert echo_only.text == "just echo" and echo_only.logprobs is None


# ------------------------------------------------------------------------------------ streaming
def test_streamed_text_equals_the_whole_response(client, model):
    prompts = ["Streaming ☃ text", "日本語の", "emoji 🎉🎉 and more"]
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=3, top_p=0.95)):
        whole = complete(client, prompt=prompts, max_tokens=25, logprobs=1, extra_body={"ignore_eos": True}, **kw)
        texts, finish, chunks = streamed(client, prompt=prompts, max_tokens=25, logprobs=1,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **kw)
        assert [texts[c.index] for c in whole.choices] == [c.text for c in whole.choices]
        assert all(finish[i] == "length" for i in range(3))
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        streamed_tokens = [t for ch in chunks for c in ch.choices if c.index == 0 for t in c.logprobs.tokens]
        assert streamed_tokens == whole.choices[0].logprobs.tokens
    # The pieces are the engine's: the text of whole tokens only, joined they are the decoded ids.
    for i, p in enumerate(prompts):
        stream = model.generate(p, 25, stop_at_eos=False)
        pieces = [piece for piece in stream]
        served = [c.text for ch in client.completions.create(model=MODEL, prompt=p, max_tokens=25, temperature=0,
                                                             stream=True, extra_body={"ignore_eos": True})
                  for c in ch.choices if c.text]
        assert served == pieces and "".join(pieces) == model.decode(stream.result.ids)


def test_stream_is_server_sent_events_ending_in_done(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"model": MODEL, "prompt": "x", "max_tokens": 3, "stream": True, "echo": True,
                            "temperature": 0}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["choices"][0]["text"] == "x" and "usage" not in first  # the echoed prompt comes first


def test_stop_string_never_shows_in_a_stream(client, model):
    full = model.complete("Repeat after me", 40, stop_at_eos=False).text
    stop = full[15:19]
    shown = ""
    for chunk in client.completions.create(model=MODEL, prompt="Repeat after me", max_tokens=40, temperature=0,
                                           stop=stop, stream=True, extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            shown += c.text
            assert full[:full.index(stop)].startswith(shown)
    assert shown == full[:full.index(stop)]


# ------------------------------------------------------------------------------------ concurrency
def test_16_concurrent_clients_each_get_what_they_would_alone(server, client):
    requests = []
    for i in range(16):
        kw = dict(prompt=f"Client {i}: " + "word " * (i % 5) * 4, max_tokens=5 + (i * 7) % 30,
                  extra_body={"ignore_eos": True})
        kw.update(dict(temperature=0) if i % 3 == 0 else dict(temperature=0.9, seed=i, top_p=0.9))
        requests.append((i % 2 == 0, kw))

    def run(item):
        stream, kw = item
        if stream:
            return streamed(client, **kw)[0][0]
        return complete(client, **kw).choices[0].text

    before = server.metric("gpt2np_requests_total", '{path="/v1/completions",status="200"}')
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, requests))
    alone = [run(item) for item in requests]
    assert together == alone
    after = server.metric("gpt2np_requests_total", '{path="/v1/completions",status="200"}')
    assert after - before == 32


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("body, status, fragment, code", [
    (b"{not json", 400, "not valid JSON", None),
    (b"[1, 2]", 400, "JSON object", None),
    (b'{"prompt": "x"}', 400, "model is required", None),
    (b'{"model": "small", "prompt": "x", "max_tokens": "5"}', 400, "max_tokens", None),
    (b'{"model": "small", "prompt": "x", "temperature": 2.5}', 400, "temperature", None),
    (b'{"model": "small", "prompt": "x", "top_p": 0}', 400, "top_p", None),
    (b'{"model": "small", "prompt": "x", "logprobs": 6}', 400, "logprobs", None),
    (b'{"model": "small", "prompt": "x", "n": 0}', 400, "n", None),
    (b'{"model": "small", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "at most 4 stop strings", None),
    (b'{"model": "small", "prompt": "x", "presence_penalty": -3}', 400, "presence_penalty", None),
    (b'{"model": "small", "prompt": "x", "logit_bias": {"50257": 1}}', 400, "outside the vocabulary", None),
    (b'{"model": "small", "prompt": "x", "logit_bias": {"a": 1}}', 400, "token ids", None),
    (b'{"model": "small", "prompt": [[1, 50257]]}', 400, "outside the vocabulary", None),
    (b'{"model": "small", "prompt": [1, "a"]}', 400, "prompt must be", None),
    (b'{"model": "small", "prompt": []}', 400, "prompt", None),
    (b'{"model": "small", "prompt": "x", "max_tokens": 64}', 400, "maximum context length is 64",
     "context_length_exceeded"),
    (b'{"model": "small", "prompt": [' + b"1, " * 70 + b'1], "max_tokens": 0}', 400, "maximum context length",
     "context_length_exceeded"),
    (b'{"model": "small", "prompt": "x", "unknown": 1}', 400, "unknown field", None),
    (b'{"model": "small", "prompt": "x", "suffix": "y"}', 400, "suffix", None),
    (b'{"model": "small", "prompt": "x", "best_of": 3}', 400, "best_of", None),
    (b'{"model": "gpt-4", "prompt": "x"}', 404, "does not exist", "model_not_found"),
    (b"", 400, "JSON", None),
    (b'{"model": "small", "prompt": "x", "temperature": NaN}', 400, "finite", None),
    (b'{"model": "small", "prompt": "x", "max_tokens": Infinity}', 400, "max_tokens", None),
    (b'{"model": "small", "prompt": "x", "max_tokens": true}', 400, "max_tokens", None),
    (b'{"model": "small", "prompt": "x", "temperature": true}', 400, "temperature", None),
    (b'{"model": "small", "prompt": "x", "seed": 1.5}', 400, "seed", None),
    (b'{"model": "small", "prompt": "x", "max_tokens": -1}', 400, "max_tokens must be", None),
    (b'{"model": "small", "prompt": [[]]}', 400, "prompt", None),
    (b'{"model": "small", "prompt": [-1]}', 400, "outside the vocabulary", None),
    (b'{"model": "small", "prompt": [1208925819614629174706176]}', 400, "outside the vocabulary", None),
    (b'{"model": "small", "prompt": [' + b"1, " * 70 + b'1], "max_tokens": null}', 400, "maximum context length",
     "context_length_exceeded"),
    (b'{"model": "small", "n": 128, "prompt": [' + b'"a", ' * 5000 + b'"a"]}', 400, "takes at most", None),
    (b'{"model": "small", "prompt": "x", "stop": "' + b"s" * 2000 + b'"}', 400, "stop", None),
    (b'{"model": "small", "prompt": "x", "logit_bias": {"1_0": 1}}', 400, "token ids", None),
    (b'{"model": "small", "prompt": "' + b"x" * (5 * 1024 * 1024) + b'"}', 413, "larger than", None),
])
def test_bad_requests_get_openais_error_shape(server, body, status, fragment, code):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"] and (code is None or error["code"] == code)


def test_other_paths_and_the_chat_endpoint(server, client):
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and "no such path" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="no chat format"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.post(server.url + "/detokenize", json={"tokens": [99999]}).status_code == 400


def test_no_input_makes_a_500_or_stops_the_server(server):
    rng = np.random.default_rng(0)
    pieces = [b'{"model": "small", "prompt": ', b'"x"', b"[1,2]", b"null", b"-1", b"1e400", b'"\\ud800"', b"{}",
              b'"max_tokens": ', b'"stream": true', b",", b"}", b"]", b'"n": 2', b'"echo": true', b'"logprobs": 5',
              b"\xff\xfe", b'"stop": "x"', b"[[]]", b"true"]
    for _ in range(150):
        body = b"".join(pieces[i] for i in rng.integers(0, len(pieces), rng.integers(1, 8)))
        r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                       timeout=30)
        assert r.status_code < 500, (body, r.text)
    assert httpx.get(server.url + "/health").status_code == 200


def test_an_idle_engine_gathers_requests_sent_together_into_one_step(model, monkeypatch):
    """Requests sent together reach the engine a few ms apart: an idle engine waits GATHER_S
    before its first step, so an item's choices read their shared context in one pass."""
    import asyncio

    import gpt2np.serve.worker as W
    from gpt2np.serve.metrics import Metrics

    monkeypatch.setattr(W, "GATHER_S", 2.0)  # long, so that the test does not race the window
    engine = model.engine(max_batch=8, prefix_cache=8)
    worker = W.EngineWorker(engine, max_queue=8, metrics=Metrics())
    passes, real = [], engine.step
    engine.step = lambda: passes.append([len(s.pending) for s in [*engine.waiting, *engine.running]]) or real()
    worker.start()
    context = list(range(100, 140))
    opts = gpt2np.Options(n_tokens=0, prompt_logprobs=1)

    async def run():
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        worker.submit([engine.sequence(context + [7], opts)], loop, queue)
        await asyncio.sleep(0.2)
        worker.submit([engine.sequence(context + [8, 9], opts)], loop, queue)
        got = [await asyncio.wait_for(queue.get(), 10) for _ in range(2)]
        for _ in range(500):  # the step after the events caches the prompts: let it run before stopping
            if engine.idle:
                break
            await asyncio.sleep(0.01)
        return got

    try:
        events = asyncio.run(run())
    finally:
        worker.stop()
    # one pass (one reads the context, one borrows it), then a step that only caches the prompts
    assert passes == [[41, 42], []]
    assert [seq.result.cached_tokens for (seq, *_), in events] == [0, 39]


def test_a_generating_request_does_not_wait_to_gather(model, monkeypatch):
    """Only prompts being scored come in bursts worth gathering: a request that generates starts
    at once (its time to first token), even with a long window."""
    import asyncio

    import gpt2np.serve.worker as W
    from gpt2np.serve.metrics import Metrics

    monkeypatch.setattr(W, "GATHER_S", 5.0)
    engine = model.engine(max_batch=8, prefix_cache=8)
    worker = W.EngineWorker(engine, max_queue=8, metrics=Metrics())
    worker.start()

    async def run():
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        start = time.perf_counter()
        worker.submit([engine.sequence(list(range(100, 140)), gpt2np.Options(n_tokens=1))], loop, queue)
        await asyncio.wait_for(queue.get(), 10)
        return time.perf_counter() - start

    try:
        seconds = asyncio.run(run())
    finally:
        worker.stop()
    assert seconds < 2.5  # half the window: it did not wait for it


def test_engine_failure_ends_every_request_it_holds(model):
    import asyncio

    from gpt2np.serve.metrics import Metrics
    from gpt2np.serve.worker import EngineWorker

    engine = model.engine(max_batch=2)
    worker = EngineWorker(engine, max_queue=4, metrics=Metrics())
    real, calls = engine.step, []

    def broken():  # a bug in the engine itself on its second step
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real()

    engine.step = broken
    worker.start()

    async def run():
        queue = asyncio.Queue()
        seqs = [engine.sequence(model.encode(p), gpt2np.Options(n_tokens=50, stop_at_eos=False)) for p in "abc"]
        worker.submit(seqs, asyncio.get_running_loop(), queue)
        ended = {}
        while len(ended) < 3:
            for seq, *_, reason in await asyncio.wait_for(queue.get(), 10):
                if reason:
                    ended[id(seq)] = reason
        return ended

    try:
        ended = asyncio.run(run())
    finally:
        worker.stop()
    assert list(ended.values()) == ["error"] * 3 and worker.active == 0  # 2 running and 1 waiting


def test_metrics(server, client):
    tokens_before = server.metric("gpt2np_generation_tokens_total")
    complete(client, prompt="metrics", max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics").text
    for name in ("gpt2np_requests_running", "gpt2np_requests_waiting", "gpt2np_prompt_tokens_total",
                 "gpt2np_time_to_first_token_seconds_bucket", "gpt2np_time_per_output_token_seconds_bucket"):
        assert name in text
    assert server.metric("gpt2np_generation_tokens_total") - tokens_before == 7
    assert server.metric("gpt2np_time_to_first_token_seconds_count") > 0


# ------------------------------------------------------------------------------------ lifecycle
# These need generation slow enough to act in the middle of it: GPT-2 small's real shapes.
def test_api_key(small_model_dir):
    with ServerProcess(small_model_dir, env={"GPT2NP_API_KEY": "sekrit"}) as s:
        name = small_model_dir.name
        wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model=name, prompt="x", max_tokens=1)
        assert httpx.get(s.url + "/v1/models").status_code == 401
        right = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0)
        assert right.completions.create(model=name, prompt="x", max_tokens=1).choices
        assert httpx.get(s.url + "/health").status_code == 200  # not under /v1
        for method, path, body in [("GET", "/tokenizer_info", None), ("POST", "/tokenize", {"prompt": "x"}),
                                   ("POST", "/detokenize", {"tokens": [1]})]:
            assert httpx.request(method, s.url + path, json=body).status_code == 401, path
            assert httpx.request(method, s.url + path, json=body,
                                 headers={"Authorization": "Bearer sekrit"}).status_code == 200, path


def test_max_stop_strings_is_configurable(small_model_dir, model):
    """OpenAI's (and vLLM's default) limit of 4 stop strings, raised by --max-stop-strings: the
    fifth string works like the others."""
    full = model.complete("Once upon a time", 30, stop_at_eos=False).text
    stops = ["never 1", "never 2", "never 3", "never 4", full[8:11]]
    with ServerProcess(small_model_dir, "--model-name", MODEL, env={"GPT2NP_MAX_STOP_STRINGS": "6"}) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        r = complete(c, prompt="Once upon a time", max_tokens=30, temperature=0, stop=stops,
                     extra_body={"ignore_eos": True})
        assert r.choices[0].text == full[:full.index(stops[-1])] and r.choices[0].finish_reason == "stop"
        with pytest.raises(openai.BadRequestError, match="at most 6 stop strings"):
            complete(c, prompt="x", stop=[f"s{i}" for i in range(7)])
    with ServerProcess(small_model_dir, "--model-name", MODEL, "--max-stop-strings", "0") as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        assert complete(c, prompt="x", max_tokens=1, stop=[]).choices
        with pytest.raises(openai.BadRequestError, match="at most 0 stop strings"):
            complete(c, prompt="x", stop="y")
    bad = run_cli("gpt-serve", str(small_model_dir), "--max-stop-strings", "-1")
    assert bad.returncode == 2 and b"--max-stop-strings" in bad.stderr


def test_connections_send_without_nagles_delay():
    """Every accepted connection has TCP_NODELAY, as asyncio means to set it: without it a
    response's last small write waited for the client's delayed ACK (40 ms a request)."""
    import socket

    from gpt2np.serve.cli import _listen

    listener = _listen("127.0.0.1", 0)
    try:
        client = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert conn.proto == socket.IPPROTO_TCP  # what asyncio's own _set_nodelay checks
        conn.close()
        client.close()
    finally:
        listener.close()


def test_step_budget_flags(small_model_dir, model):
    """A small --max-num-batched-tokens: long prompts are read a few positions per step beside
    the decoding ones, and every answer is what the model gives alone. Bad budgets are one-line errors."""
    prompts = [list(range(100 + 7 * i, 140 + 7 * i)) for i in range(4)]
    with ServerProcess(small_model_dir, "--model-name", MODEL, "--max-batch", "4", "--max-num-batched-tokens", "6",
                       "--prefill-stall", "1.5") as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: complete(c, prompt=p, max_tokens=6, temperature=0,
                                                   extra_body={"ignore_eos": True}).choices[0].text, prompts))
        assert got == [model.complete(p, 6, stop_at_eos=False).text for p in prompts]
    bad = run_cli("gpt-serve", str(small_model_dir), "--max-batch", "8", "--max-num-batched-tokens", "4")
    err = bad.stderr.decode()
    assert bad.returncode == 1 and err.count("\n") == 1 and "--max-num-batched-tokens (4) must be at least" in err
    bad = run_cli("gpt-serve", str(small_model_dir), "--prefill-stall", "1")
    assert bad.returncode == 2 and b"--prefill-stall" in bad.stderr


@pytest.fixture(scope="module")
def big_server(model_124M_dir):
    with ServerProcess(model_124M_dir, "--max-batch", "2", "--max-queue", "1", "--grace-period", "60") as s:
        yield s


def test_disconnect_mid_stream_frees_its_slot(big_server):
    s = big_server
    cancelled = s.metric("gpt2np_sequences_finished_total", '{reason="cancelled"}')
    with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                      json={"model": "model", "prompt": "Hello", "max_tokens": 1000, "stream": True,
                            "ignore_eos": True}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line)
        assert s.metric("gpt2np_requests_running") == 1
    s.wait_for(lambda: s.metric("gpt2np_requests_running") == 0, what="the running gauge to drop")
    s.wait_for(lambda: s.metric("gpt2np_sequences_finished_total", '{reason="cancelled"}') == cancelled + 1,
               what="the sequence to be cancelled")


def test_disconnect_while_waiting_for_a_whole_response_cancels_it(big_server):
    s = big_server
    cancelled = s.metric("gpt2np_sequences_finished_total", '{reason="cancelled"}')
    with pytest.raises(httpx.TimeoutException):  # the client gives up and closes the connection
        httpx.post(s.url + "/v1/completions", timeout=1.5,
                   json={"model": "model", "prompt": "Hello", "max_tokens": 1000, "ignore_eos": True})
    s.wait_for(lambda: s.metric("gpt2np_sequences_finished_total", '{reason="cancelled"}') == cancelled + 1,
               what="the sequence to be cancelled")
    assert s.metric("gpt2np_requests_running") == 0


def test_full_queue_answers_429(big_server):
    s = big_server
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
    stop = threading.Event()

    def long_stream():
        with client.completions.create(model="model", prompt="Hello", max_tokens=1000, stream=True,
                                       extra_body={"ignore_eos": True}) as stream:
            for _ in stream:
                if stop.is_set():
                    break  # leaving the block closes the connection

    threads = [threading.Thread(target=long_stream) for _ in range(3)]  # 2 running + 1 waiting
    for t in threads:
        t.start()
    try:
        s.wait_for(lambda: s.metric("gpt2np_requests_running") == 2 and s.metric("gpt2np_requests_waiting") == 1,
                   what="a full batch and queue")
        r = httpx.post(s.url + "/v1/completions", json={"model": "model", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="model", prompt="x", max_tokens=1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    s.wait_for(lambda: s.metric("gpt2np_requests_running") + s.metric("gpt2np_requests_waiting") == 0,
               what="the cancelled streams to leave")


def test_sigterm_drains_running_requests_then_exits_0(model_124M_dir):
    s = ServerProcess(model_124M_dir)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        result = {}

        def run():
            result["r"] = complete(client, model="model", prompt="Draining", max_tokens=40, temperature=0,
                                   extra_body={"ignore_eos": True})

        t = threading.Thread(target=run)
        t.start()
        s.wait_for(lambda: s.metric("gpt2np_requests_running") == 1, what="the request to run")
        s.terminate()
        s.wait_for(lambda: httpx.get(s.url + "/health").status_code == 503, what="503 while draining")
        late = httpx.post(s.url + "/v1/completions", json={"model": "model", "prompt": "x"})
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        t.join(timeout=60)
        assert result["r"].usage.completion_tokens == 40 and result["r"].choices[0].finish_reason == "length"
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.stop()
    assert "Traceback" not in s.output()


def test_grace_period_ends_with_a_clear_503_then_exit_0(model_124M_dir):
    s = ServerProcess(model_124M_dir, "--grace-period", "1")
    try:
        result = {}

        def run():
            result["r"] = httpx.post(s.url + "/v1/completions", timeout=60,
                                     json={"model": "model", "prompt": "x", "max_tokens": 1000, "ignore_eos": True})

        def stream():
            with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                              json={"model": "model", "prompt": "y", "max_tokens": 1000, "ignore_eos": True,
                                    "stream": True}) as r:
                result["events"] = [line for line in r.iter_lines() if line]

        threads = [threading.Thread(target=run), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        s.wait_for(lambda: s.metric("gpt2np_requests_running") == 2, what="both requests to run")
        s.terminate()
        for t in threads:
            t.join(timeout=60)
        r = result["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        events = result["events"]
        assert events[-1] == "data: [DONE]" and '"shutting_down"' in events[-2]
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.stop()


def test_prefix_cache_over_http(server, client, model):
    """Requests shaped as lm-evaluation-harness sends them (echo, logprobs, token ids): the second
    reads the shared context from the cache (usage says how much), with the same log-probabilities;
    vLLM's metric names count it; another cache_salt shares nothing."""
    rng = np.random.default_rng(9)
    context = [int(i) for i in rng.integers(0, 50257, 40)]
    queries, hits = server.metric("gpt2np_prefix_cache_queries_total"), server.metric("gpt2np_prefix_cache_hits_total")
    first, second = (complete(client, prompt=context + [int(t)], max_tokens=1, temperature=0, logprobs=1, echo=True)
                     for t in (11, 12))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # two blocks of 16 and the first prompt's partial last block as far as they share it (the
    # 40-token context), all but the last position
    assert second.usage.prompt_tokens_details.cached_tokens == 39
    np.testing.assert_allclose(first.choices[0].logprobs.token_logprobs[1:-2],
                               second.choices[0].logprobs.token_logprobs[1:-2], atol=1e-5)
    assert server.metric("gpt2np_prefix_cache_hits_total") - hits == 39
    assert server.metric("gpt2np_prefix_cache_queries_total") - queries == 2 * 41
    assert server.metric("gpt2np_prefix_cache_bytes") > 0
    salted = complete(client, prompt=context + [13], max_tokens=1, extra_body={"cache_salt": "tenant-b"})
    assert salted.usage.prompt_tokens_details.cached_tokens == 0
