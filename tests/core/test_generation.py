"""Generation beyond greedy: stop strings, batches, sliding window, log-probabilities."""


import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

import gpt2np
from gpt2np.stops import StopStrings
from conftest import SMALL_HPARAMS

tf_reference = pytest.importorskip("helpers.tf_reference")


@settings(max_examples=300, deadline=None)
@example(text="aca", cuts=[2], stops=["c", "aca"])  # found by hypothesis: two stops, one inside the other
@given(st.text(alphabet="abc\n", max_size=30), st.lists(st.integers(0, 30), max_size=6),
       st.lists(st.text(alphabet="abc\n", min_size=1, max_size=3), min_size=1, max_size=3))
def test_stop_strings_stream_safely(text, cuts, stops):
    cuts = sorted(set(c for c in cuts if c <= len(text)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    # The stop string completed first (earliest end, then earliest start), whatever the cuts.
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    first = min(hits)[1] if hits else None
    expected = text if first is None else text[:first]
    matcher, shown, stopped = StopStrings(stops), "", False
    for piece in pieces:
        out, stopped = matcher.feed(piece)
        shown += out
        assert expected.startswith(shown)  # nothing shown is ever taken back
        assert not any(s in shown for s in stops)
        if stopped:
            break
    if not stopped:
        shown += matcher.flush()
    assert shown == expected and stopped == (first is not None)


def test_stop_string_ends_generation(model):
    plain = model.complete("Once upon a time", 30, stop_at_eos=False)
    stop = plain.text[10:13]
    assert len(stop) == 3
    cut = model.generate("Once upon a time", 30, stop_at_eos=False, stop=[stop, "never appears"])
    pieces = list(cut)
    g = cut.result
    assert g.stop_reason == "stop"
    assert "".join(pieces) == g.text == plain.text[:plain.text.index(stop)]
    assert g.ids == plain.ids[:len(g.ids)] and len(g.ids) < 30


def test_stop_reasons(model):
    assert model.complete("Hi", 5, stop_at_eos=False).stop_reason == "length"
    assert model.complete("Hi", 0).stop_reason == "length" and model.complete("Hi", 0).ids == []
    assert model.complete([1] * 62, 9, stop_at_eos=False).stop_reason == "context"


def test_batch_equals_one_prompt_at_a_time(model):
    prompts = ["Hello", "The quick brown fox jumps over", "日本語", "a b c d e f g h i j k l m n o p",
               "x", "Once upon a time there was", "1 2 3", "¿Qué?"]
    batch = model.generate_batch(prompts, 20, stop_at_eos=False)
    singles = [model.complete(p, 20, stop_at_eos=False) for p in prompts]
    assert [b.ids for b in batch] == [s.ids for s in singles]
    assert [b.text for b in batch] == [s.text for s in singles]
    np.testing.assert_allclose([b.logprobs for b in batch], [s.logprobs for s in singles], atol=1e-5)
    # Each prompt keeps its own stop rule and stopping point.
    stop = singles[1].text[4:7]
    mixed = model.generate_batch(prompts, 20, stop_at_eos=False, stop=[stop])
    assert mixed[1].stop_reason == "stop" and len(mixed[1].ids) < 20
    assert [m.ids for m in mixed] == [model.complete(p, 20, stop_at_eos=False, stop=[stop]).ids for p in prompts]


def test_batch_sampling_with_a_seed_equals_single(model):
    prompts = ["alpha", "beta gamma", "delta"]
    opts = dict(temperature=1.2, top_k=50, top_p=0.95, seed=7, stop_at_eos=False)
    batch = model.generate_batch(prompts, 15, **opts)
    assert [b.ids for b in batch] == [model.complete(p, 15, **opts).ids for p in prompts]
    assert model.complete("alpha", 15, **opts).ids == batch[0].ids  # reproducible
    assert model.complete("alpha", 15, **{**opts, "seed": 8}).ids != batch[0].ids


def test_sliding_window_continues_from_the_recent_half(model):
    prompt = list(range(1000, 1060))
    g = model.complete(prompt, 12, stop_at_eos=False, sliding_window=True)
    assert len(g.ids) == 12 and g.stop_reason == "length"
    # 5 tokens fill the 64 positions; then the cache is rebuilt from the last 32 tokens.
    assert g.ids[:5] == model.complete(prompt, 5, stop_at_eos=False).ids
    window = (prompt + g.ids[:5])[-32:]
    assert g.ids[5:] == model.complete(window, 7, stop_at_eos=False).ids


def test_logprobs_match_the_reference(model, small_weights):
    g = model.complete("The meaning of life", 10, stop_at_eos=False)
    ids = g.prompt_ids + g.ids
    ref = tf_reference.logits(small_weights, SMALL_HPARAMS, ids).astype(np.float64)
    ref_lp = ref - np.log(np.exp(ref - ref.max(1, keepdims=True)).sum(1, keepdims=True)) - ref.max(1, keepdims=True)
    n = len(g.prompt_ids)
    expected = [ref_lp[n - 1 + i, t] for i, t in enumerate(g.ids)]
    np.testing.assert_allclose(g.logprobs, expected, atol=1e-4)


def test_each_tokens_text_is_kept_once_in_the_generation(small_model_dir):
    """Generation.token_texts: each generated token's text, decoded once (a character split across
    tokens comes with the token that completes it); they join to the text when nothing is cut,
    and <|endoftext|> keeps its own name."""
    model = gpt2np.load(small_model_dir)
    g = model.complete("日本語のテキスト", 12, stop_at_eos=False)
    assert len(g.token_texts) == len(g.ids) and "".join(g.token_texts) == g.text == model.decode(g.ids)
    eos = model.complete("x", 5, logit_bias={50256: 100})
    assert eos.ids == [50256] and eos.token_texts == ["<|endoftext|>"] and eos.text == ""
    events = list(model.queue(["日本語のテキスト"], 12, stop_at_eos=False)[0].events())
    assert [e.token_text for e in events] == g.token_texts and "".join(e.text for e in events) == g.text
