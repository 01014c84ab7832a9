"""lm-evaluation-harness against a real `gpt-serve`, the way people evaluate a model behind vLLM:
`lm_eval --model local-completions` as a subprocess, on tasks these tests write themselves (the
harness cannot download data sets here). Every number it reports is checked against the
in-process `GPT2`, request by request, in three modes: token-id prompts, text prompts
(`tokenized_requests=False`) and vLLM's remote tokenizer (`tokenizer_backend=remote`)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess

import httpx
import numpy as np
import pytest

import gpt2np
from conftest import BIN
from helpers.sampling_reference import log_softmax
from helpers.serve_process import ServerProcess

lm_eval_utils = pytest.importorskip("lm_eval.utils", reason="lm-evaluation-harness (the test extra) is not installed")

MODEL = "small"
MAX_LENGTH = 64  # the small test model's context, passed as lm-eval's max_length (1024 for GPT-2)
MAX_GEN_TOKS = 12

CONTEXTS = [
    "The history of the city begins with a small settlement on the river",
    "In mathematics, a prime number is a natural number greater than one",
    "She opened the door slowly and looked into the dark room",
    "Scientists announced on Tuesday that the new telescope had found",
    "The recipe calls for two cups of flour, a pinch of salt and",
    "After the long winter, the farmers were eager to plant",
    "Question: What is the capital of France?\nAnswer:",
    "He said that he would never again trust a man who",
    "The committee voted to approve the budget for next year",
    "Once upon a time there lived a king who had three daughters",
    "The train was late again, so we decided to walk",
    "Water boils at one hundred degrees Celsius at sea level, but",
]

LONG_TEXTS = [  # longer than the test model's context: scored in rolling windows
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way. In short, the period was so far like the present period that some of its noisiest "
    "authorities insisted on its being received, for good or for evil, in the superlative degree of "
    "comparison only.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little and see the "
    "watery part of the world. It is a way I have of driving off the spleen and regulating the circulation. "
    "Whenever I find myself growing grim about the mouth, I account it high time to get to sea as soon as I can.",
]

API_KEY = "lm-eval-key"
MODES = {
    "token ids": "tokenizer_backend=huggingface,tokenizer={model_dir}",
    "text prompts": "tokenizer_backend=huggingface,tokenizer={model_dir},tokenized_requests=False",
    # against a server with an API key: lm-eval sends OPENAI_API_KEY to /v1/ and auth_token to the tokenizer
    "remote tokenizer": f"tokenizer_backend=remote,auth_token={API_KEY}",
}


def serve(model_dir, api_key: str | None):
    # lm-eval sends a task's `until` plus <|endoftext|>: more stop strings than OpenAI's 4.
    key = ("--api-key", api_key) if api_key else ()
    with ServerProcess(model_dir, "--model-name", MODEL, "--max-batch", "6", "--prefill-chunk", "16",
                       "--max-stop-strings", "8", *key) as s:
        s.api_key = api_key
        yield s
        output = s.output()
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def open_server(small_model_dir):
    yield from serve(small_model_dir, None)


@pytest.fixture(scope="module")
def keyed_server(small_model_dir):
    yield from serve(small_model_dir, API_KEY)


def boundary_stop(model, context: str) -> str:
    """A stop string that crosses a token boundary in the middle of the greedy continuation."""
    g = model.complete(context, MAX_GEN_TOKS, stop_at_eos=False)
    cut = len(model.decode(g.ids[:4]))
    return g.text[cut - 2:cut + 2]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, model):
    """Four tasks in lm-eval's YAML, on JSON-lines files: multiple choice, rolling perplexity,
    greedy generation with stop strings, and loglikelihood whose `acc` is `is_greedy`."""
    d = tmp_path_factory.mktemp("lm_eval_tasks")

    def task(name, rows, **spec):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
                 f"    test: {d / (name + '.jsonl')}", "test_split: test"]
        lines += [f"{k}: {json.dumps(v)}" for k, v in spec.items()]
        (d / f"{name}.yaml").write_text("\n".join(lines) + "\n")

    rng = np.random.default_rng(0)
    words = [" blue", " river", " seven", " the", " quickly", " computer", " and", " a house", " of the"]
    task("np_mc", [{"q": c, "choices": [str(w) for w in rng.choice(words, 4, replace=False)], "answer": 0}
                   for c in CONTEXTS[:6]],
         output_type="multiple_choice", doc_to_text="{{q}}", doc_to_choice="{{choices}}",
         doc_to_target="{{answer}}", metric_list=[{"metric": "acc"}])
    task("np_rolling", [{"text": t} for t in LONG_TEXTS], output_type="loglikelihood_rolling",
         doc_to_text="", doc_to_target="{{text}}", metric_list=[{"metric": "word_perplexity"}])
    stops = [boundary_stop(model, c) for c in CONTEXTS[:5]]  # five: more than OpenAI's 4
    task("np_gen", [{"q": c, "a": ""} for c in CONTEXTS], output_type="generate_until", doc_to_text="{{q}}",
         doc_to_target="{{a}}", generation_kwargs={"until": stops, "do_sample": False, "max_gen_toks": MAX_GEN_TOKS},
         metric_list=[{"metric": "exact_match"}])
    greedy_rows = []
    for i, c in enumerate(CONTEXTS):
        own = model.complete(c, 1 + i % 3, stop_at_eos=False).text  # the model's own greedy continuation
        greedy_rows.append({"context": c, "target": own if i % 4 != 3 else str(rng.choice(words))})
    task("np_greedy", greedy_rows, output_type="loglikelihood", doc_to_text="{{context}}",
         doc_to_target="{{target}}", target_delimiter="", metric_list=[{"metric": "acc"}, {"metric": "perplexity"}])
    return d, stops


def run_lm_eval(server, tasks_dir, mode: str, model_dir, out) -> dict[str, list[dict]]:
    """lm_eval as a user runs it; returns each task's logged samples."""
    args = (f"model={MODEL},base_url={server.url}/v1/completions,num_concurrent=4,max_length={MAX_LENGTH},"
            + MODES[mode].format(model_dir=model_dir))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(out / "datasets-cache"), "HF_HOME": str(out / "hf-home"),
           "OPENAI_API_KEY": server.api_key or ""}
    r = subprocess.run([str(BIN / "lm_eval"), "--model", "local-completions", "--model_args", args,
                        "--tasks", "np_mc,np_rolling,np_gen,np_greedy", "--include_path", str(tasks_dir),
                        "--output_path", str(out), "--log_samples"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        name = re.match(r"samples_(np_\w+?)_\d{4}-", path.name).group(1)
        samples[name] = [json.loads(line) for line in path.read_text().splitlines()]
    assert set(samples) == {"np_mc", "np_rolling", "np_gen", "np_greedy"}
    return samples


class InProcess:
    """What each lm-eval request should get, computed with the in-process model: lm-eval's own
    rules for turning (context, continuation) into a request (`_encode_pair`, truncation to
    max_length - 1 tokens, rolling windows from lm_eval.utils), then `GPT2.logits`."""

    def __init__(self, model: gpt2np.GPT2, mode: str):
        self.model, self.text_prompts = model, mode == "text prompts"
        self.max_length = MAX_LENGTH - 1  # lm-eval keeps one position for the token it asks for

    def encode(self, text: str) -> list[int]:
        return self.model.encode(text, allowed_special=True)

    def tokens(self, inp: list[int]) -> list[int]:
        """The ids the server reads: with text prompts, lm-eval decodes the ids and the server
        encodes the text again (our texts round-trip: checked)."""
        if not self.text_prompts:
            return inp
        again = self.encode(self.model.decode(inp))
        assert again == inp
        return again

    def loglikelihood_tokens(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        inp = (ctx + cont)[-self.max_length:]
        ctxlen = len(ctx) - max(0, len(ctx) + len(cont) - self.max_length)
        ids = self.tokens(inp)
        logits = self.model.logits(ids)
        lp = log_softmax(logits)
        positions = range(ctxlen, len(ids))
        total = math.fsum(lp[j - 1, ids[j]] for j in positions)
        greedy = all(int(np.argmax(logits[j - 1])) == ids[j] for j in positions)
        return total, greedy

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        if context == "":
            return self.loglikelihood_tokens([self.model.config.eos_token_id], self.encode(continuation))
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return self.loglikelihood_tokens(ctx, whole[len(ctx):])

    def rolling(self, text: str) -> float:
        windows = map(lm_eval_utils.make_disjoint_window, lm_eval_utils.get_rolling_token_windows(
            token_list=self.encode(text), prefix_token=self.model.config.eos_token_id,
            max_seq_len=self.max_length - 1, context_len=1))
        return math.fsum(self.loglikelihood_tokens(ctx, cont)[0] for ctx, cont in windows)

    def generate(self, context: str, until: list[str]) -> str:
        ids = self.encode(context)
        if not self.text_prompts:
            ids = ids[-(self.max_length - MAX_GEN_TOKS):]
        return self.model.complete(ids, MAX_GEN_TOKS, stop=until).text


def close(got: str | float, expected: float) -> bool:
    return abs(float(got) - expected) <= 1e-6 * abs(expected)


@pytest.mark.parametrize("mode", list(MODES))
def test_lm_eval_numbers_equal_the_in_process_model(request, tasks, model, small_model_dir, tmp_path, mode):
    # the remote tokenizer against a server with an API key, the other modes against an open one
    server = request.getfixturevalue("keyed_server" if mode == "remote tokenizer" else "open_server")
    tasks_dir, stops = tasks
    errors_before = server_errors(server)
    samples = run_lm_eval(server, tasks_dir, mode, small_model_dir, tmp_path)
    ref = InProcess(model, mode)

    for s in samples["np_mc"]:
        for args, resp in zip(s["arguments"].values(), s["resps"]):
            ll, greedy = ref.loglikelihood(args["arg_0"], args["arg_1"])
            assert close(resp[0][0], ll) and resp[0][1] == str(greedy), (args, resp, ll, greedy)
    assert len(samples["np_mc"]) == 6

    for s in samples["np_rolling"]:
        expected = ref.rolling(s["doc"]["text"])
        assert close(s["resps"][0][0], expected), (s["resps"], expected)
    assert len(samples["np_rolling"]) == 2 and all(len(model.encode(t)) > MAX_LENGTH + 20 for t in LONG_TEXTS)

    own_stop_ended_it = 0
    for s in samples["np_gen"]:
        args = s["arguments"]["gen_args_0"]
        until = args["arg_1"]["until"]
        assert until == stops
        expected = ref.generate(args["arg_0"], until + ["<|endoftext|>"])
        assert s["resps"][0][0] == expected
        if args["arg_0"] in CONTEXTS[:len(stops)]:
            stop = stops[CONTEXTS.index(args["arg_0"])]
            full = model.complete(ref.encode(args["arg_0"]), MAX_GEN_TOKS, stop_at_eos=False).text
            own_stop_ended_it += full.startswith(expected + stop)
    assert own_stop_ended_it >= 3  # stop strings that cross a token boundary ended generations there

    greedy_flags = []
    for s in samples["np_greedy"]:
        args = s["arguments"]["gen_args_0"]
        ll, greedy = ref.loglikelihood(args["arg_0"], args["arg_1"])
        (got_ll, got_greedy), = s["resps"][0]
        assert close(got_ll, ll) and got_greedy == str(greedy), (args, got_ll, got_greedy, ll, greedy)
        assert s["acc"] == float(greedy)
        greedy_flags.append(greedy)
    assert sum(greedy_flags) >= 6 and not all(greedy_flags)  # both outcomes occur: the check can fail

    assert server_errors(server) == errors_before, "the server answered some request with 4xx or 5xx"


def server_errors(server) -> dict[str, float]:
    """Requests the server answered with 4xx or 5xx, by path and status (its /metrics)."""
    text = httpx.get(server.url + "/metrics").text  # /metrics needs no key
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^gpt2np_requests_total(\{[^}]*status="[45]\d\d"[^}]*\}) (\S+)$', text, re.M)}
