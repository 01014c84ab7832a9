"""An independent GPT-2 in TensorFlow, after OpenAI's gpt-2/src/model.py, for checking the runtime.

It reads weights under the checkpoint's own names and shapes (`model/h0/attn/c_attn/w` [1, E, 3E])
and recomputes the whole sequence every time: no cache, nothing shared with the NumPy runtime.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads: no CUDA probing noise
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def _norm(x, g, b, eps=1e-5):
    u = tf.reduce_mean(x, axis=-1, keepdims=True)
    s = tf.reduce_mean(tf.square(x - u), axis=-1, keepdims=True)
    return (x - u) * tf.math.rsqrt(s + eps) * g + b


def _conv1d(x, w, b):
    return tf.matmul(x, w[0]) + b  # w is [1, nx, nf] as in the checkpoint


def _gelu(x):
    return 0.5 * x * (1 + tf.tanh(np.sqrt(2 / np.pi).astype(np.float32) * (x + 0.044715 * tf.pow(x, 3))))


def _attn(x, p, h, n_head):
    """(output [T, E], softmax probabilities [n_head, T, T])."""
    T, E = x.shape
    c = _conv1d(x, p[h + "attn/c_attn/w"], p[h + "attn/c_attn/b"])
    q, k, v = (tf.transpose(tf.reshape(t, [T, n_head, E // n_head]), [1, 0, 2]) for t in tf.split(c, 3, axis=-1))
    w = tf.matmul(q, k, transpose_b=True) * tf.math.rsqrt(tf.cast(E // n_head, tf.float32))
    b = tf.linalg.band_part(tf.ones([T, T]), -1, 0)  # causal mask, as attention_mask() in model.py
    w = w * b - tf.cast(1e10, w.dtype) * (1 - b)
    probs = tf.nn.softmax(w, axis=-1)
    a = tf.matmul(probs, v)
    a = tf.reshape(tf.transpose(a, [1, 0, 2]), [T, E])
    return _conv1d(a, p[h + "attn/c_proj/w"], p[h + "attn/c_proj/b"]), probs


def internals(weights: dict[str, np.ndarray], hparams: dict, ids):
    """(hidden states [n_layer + 1, T, E] as Hugging Face defines them: the embeddings, each
    block's output, the last after ln_f; attention probabilities [n_layer, n_head, T, T];
    logits [T, n_vocab])."""
    p = {k: tf.constant(v) for k, v in weights.items()}
    ids = tf.constant(np.asarray(ids, dtype=np.int32))
    x = tf.gather(p["model/wte"], ids) + p["model/wpe"][: ids.shape[0]]
    hidden, attentions = [x], []
    for i in range(hparams["n_layer"]):
        h = f"model/h{i}/"
        a, probs = _attn(_norm(x, p[h + "ln_1/g"], p[h + "ln_1/b"]), p, h, hparams["n_head"])
        x = x + a
        m = _gelu(_conv1d(_norm(x, p[h + "ln_2/g"], p[h + "ln_2/b"]), p[h + "mlp/c_fc/w"], p[h + "mlp/c_fc/b"]))
        x = x + _conv1d(m, p[h + "mlp/c_proj/w"], p[h + "mlp/c_proj/b"])
        hidden.append(x)
        attentions.append(probs)
    x = _norm(x, p["model/ln_f/g"], p["model/ln_f/b"])
    hidden[-1] = x
    logits = tf.matmul(x, p["model/wte"], transpose_b=True)
    return np.stack([t.numpy() for t in hidden]), np.stack([t.numpy() for t in attentions]), logits.numpy()


def logits(weights: dict[str, np.ndarray], hparams: dict, ids) -> np.ndarray:
    """Logits [T, n_vocab] for every position of `ids`."""
    return internals(weights, hparams, ids)[2]


def greedy(weights: dict[str, np.ndarray], hparams: dict, ids, n_tokens: int):
    """Greedy continuation by full recompute: (new ids, the logits that chose each)."""
    ids, out, chosen_from = list(ids), [], []
    for _ in range(n_tokens):
        last = logits(weights, hparams, ids)[-1]
        token = int(np.argmax(last))
        out.append(token)
        chosen_from.append(last)
        ids.append(token)
    return out, np.stack(chosen_from)
