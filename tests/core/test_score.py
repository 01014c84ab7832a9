"""Scoring against an independent computation with the TensorFlow reference."""

import math

import numpy as np
import pytest

import gpt2np
from gpt2np import GPT2Error
from conftest import SMALL_HPARAMS

tf_reference = pytest.importorskip("helpers.tf_reference")
EOS = 50256


def reference_logprobs(weights, ids, window, stride):
    """The documented method, computed with the TF model: [eos] + ids, windows of `window`
    positions moving by `stride`, each scoring the tokens no earlier window scored."""
    seq = [EOS] + ids
    out, scored, begin = [], 1, 0
    while scored < len(seq):
        end = min(begin + window, len(seq))
        z = tf_reference.logits(weights, SMALL_HPARAMS, seq[begin:end]).astype(np.float64)
        lp = z - z.max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        out += [lp[j - 1 - begin, seq[j]] for j in range(scored, end)]
        scored, begin = end, begin + stride
    return out


def test_short_text_scores_every_token(small_model_dir, small_weights):
    model = gpt2np.load(small_model_dir)
    text = "The cat sat on the mat."
    s = model.score(text)
    assert s.ids == model.encode(text)
    np.testing.assert_allclose(s.logprobs, reference_logprobs(small_weights, s.ids, 64, 32), atol=1e-4)
    assert math.isclose(s.nll, -sum(s.logprobs)) and math.isclose(s.perplexity, math.exp(s.nll / len(s.ids)))


@pytest.mark.parametrize("stride", [None, 1, 20, 63])
def test_long_text_uses_the_sliding_window(small_model_dir, small_weights, stride):
    model = gpt2np.load(small_model_dir)
    text = " ".join(f"word{i}" for i in range(60))  # well over the 64-position context
    s = model.score(text, stride=stride)
    assert len(s.ids) == 120 and len(s.logprobs) == len(s.ids)
    expected = reference_logprobs(small_weights, s.ids, 64, stride or 32)
    np.testing.assert_allclose(s.logprobs, expected, atol=1e-4)


def test_score_batch_reads_texts_and_windows_together(small_model_dir, small_weights):
    """score_batch: each text's result equals the reference (long texts by their windows, read
    beside the others a few at a time), errors in place, in order; the same through the engine
    whatever the number of windows at once."""
    model = gpt2np.load(small_model_dir)
    long = " ".join(f"word{i}" for i in range(60))
    texts = ["The cat sat on the mat.", long, "", 7, "A third text, scored beside the others.", [464, 3797]]
    for max_batch in (1, 3, 8):
        results = model.score_batch(texts, stride=20, max_batch=max_batch)
        assert [r.error is None for r in results] == [True, True, False, False, True, True]
        assert "nothing to score" in results[2].error and "must be a string" in results[3].error
        assert results[2].to_dict() == {"ids": [], "error": results[2].error} and math.isnan(results[3].perplexity)
        for text, r in zip(texts, results):
            if r.error is None:
                ids = model.encode(text) if isinstance(text, str) else text
                assert r.ids == ids and (r.stride, r.window) == (20, 64)
                np.testing.assert_allclose(r.logprobs, reference_logprobs(small_weights, ids, 64, 20), atol=1e-4)
                assert r.logprobs == pytest.approx(model.score(text, stride=20).logprobs, abs=1e-5)


def test_score_errors(small_model_dir):
    model = gpt2np.load(small_model_dir)
    with pytest.raises(GPT2Error, match="nothing to score"):
        model.score("")
    with pytest.raises(GPT2Error, match="stride"):
        model.score("abc", stride=64)
