"""The readable reference forward pass and `GPT2.trace`: equal to the fast path, and inside equal
to an independent TensorFlow GPT-2."""

import numpy as np
import pytest

import gpt2np
from gpt2np import GPT2Error, reference
from conftest import SMALL_HPARAMS

tf_reference = pytest.importorskip("helpers.tf_reference")

PROMPT = "The quick brown fox jumps over the lazy dog. Ünïcödé, 日本語, and emoji 🙂!"


def test_trace_has_hugging_faces_shapes_in_float32(model):
    ids = model.encode(PROMPT)
    t = model.trace(ids)
    c, T = model.config, len(ids)
    assert t.hidden_states.shape == (c.n_layer + 1, T, c.n_embd)
    assert t.attentions.shape == (c.n_layer, c.n_head, T, T)
    assert t.logits.shape == (T, c.vocab_size)
    assert {t.hidden_states.dtype, t.attentions.dtype, t.logits.dtype} == {np.dtype(np.float32)}
    assert t.ids.tolist() == ids and model.trace(PROMPT).ids.tolist() == ids


def test_reference_logits_equal_the_fast_path(model):
    ids = model.encode(PROMPT)
    fast, ref = model.logits(ids), model.trace(ids).logits
    err = float(np.max(np.abs(fast - ref)))
    assert err <= 2e-5 * max(1.0, float(np.max(np.abs(ref)))), err
    assert int(np.argmax(fast[-1])) == int(np.argmax(ref[-1]))


def test_attention_rows_are_probabilities_over_the_past(model):
    a = model.trace(PROMPT).attentions
    np.testing.assert_allclose(a.sum(axis=-1), 1.0, rtol=1e-5)
    T = a.shape[-1]
    assert np.all(a[..., np.triu_indices(T, k=1)[0], np.triu_indices(T, k=1)[1]] == 0)
    assert np.all(a >= 0) and np.all(a[..., 0, 0] == 1)  # the first token can only attend to itself


def test_trace_equals_tensorflow_inside(model, small_weights):
    ids = model.encode(PROMPT)
    hidden, attentions, logits = tf_reference.internals(small_weights, SMALL_HPARAMS, ids)
    t = model.trace(ids)
    for layer, (ours, theirs) in enumerate(zip(t.hidden_states, hidden)):
        err = float(np.max(np.abs(ours - theirs)))
        assert err <= 2e-5 * max(1.0, float(np.max(np.abs(theirs)))), f"hidden state {layer}: {err:.3g}"
    np.testing.assert_allclose(t.attentions, attentions, atol=2e-6)
    np.testing.assert_allclose(t.logits, logits, atol=2e-5 * max(1.0, float(np.max(np.abs(logits)))))


def test_the_last_hidden_state_is_after_ln_f_and_feeds_the_head(model):
    t = model.trace(PROMPT)
    np.testing.assert_allclose(t.hidden_states[-1] @ model.params.wte.T, t.logits, rtol=1e-5, atol=1e-4)
    # the one before it is a raw block output: ln_f of it is not itself
    assert not np.allclose(reference.layer_norm(t.hidden_states[-2], model.params.ln_f, 1e-5), t.hidden_states[-2])


def test_logit_lens_reads_each_layer_through_ln_f_and_the_head(model):
    t = model.trace(PROMPT)
    ids, probs = reference.logit_lens(model.params, model.config, t, k=3)
    L1, T = t.hidden_states.shape[:2]
    assert ids.shape == probs.shape == (L1, T, 3)
    assert ids[-1, :, 0].tolist() == np.argmax(t.logits, axis=-1).tolist()  # the last layer is the output
    assert np.all(np.diff(probs, axis=-1) <= 0) and np.all((probs > 0) & (probs <= 1))
    p = reference.softmax(t.logits)
    np.testing.assert_allclose(probs[-1, :, 0], p.max(axis=-1), rtol=1e-5)


def test_reference_functions_read_like_the_math():
    x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    ln = reference.layer_norm(x, gpt2np.model.LayerNorm(np.ones(4, np.float32), np.zeros(4, np.float32)), 1e-5)
    np.testing.assert_allclose(ln, (x - 2.5) / np.sqrt(1.25 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(reference.gelu(np.array([0.0, 1.0], np.float32)), [0.0, 0.841192], rtol=1e-5)
    out, probs = reference.attention(np.ones((2, 4), np.float32), np.ones((2, 4), np.float32),
                                     np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.float32),
                                     np.array([[0, -np.inf], [0, 0]], np.float32))
    np.testing.assert_allclose(probs, [[1, 0], [0.5, 0.5]])
    np.testing.assert_allclose(out, [[1, 0, 0, 0], [0.5, 0.5, 0, 0]])


@pytest.mark.parametrize("ids", [[], list(range(65)), [50257]])
def test_trace_refuses_what_does_not_fit(model, ids):
    with pytest.raises(GPT2Error):
        model.trace(ids)
