"""GPT-2 written to read like the math: the readable reference of the model, and `trace`.

One sequence, the whole of it recomputed, no cache, no batching, no in-place tricks: each function
is the formula. `model.py` is the fast path (KV cache, batches of sequences, blocked attention,
work done in place); the tests prove the two give the same logits, and this one equal to an
independent TensorFlow GPT-2 inside as well (hidden states and attention). `trace` keeps what a
forward pass computes on the way, for `GPT2.trace` and `gpt-explain`.

Shapes: T positions, E = n_embd, H = n_head, D = E / H, F = 4E, V = vocab size. Every constant
is float32, so that NumPy never promotes the activations to float64.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .config import GPT2Config
from .params import Block, LayerNorm, Linear, Params


def layer_norm(x: np.ndarray, p: LayerNorm, eps: float) -> np.ndarray:  # [T, E] -> [T, E]
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return p.g * (x - mean) / np.sqrt(var + np.float32(eps)) + p.b


def gelu(x: np.ndarray) -> np.ndarray:  # [T, F] -> [T, F]
    return np.float32(0.5) * x * (1 + np.tanh(np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x ** 3)))


def softmax(x: np.ndarray) -> np.ndarray:  # over the last axis
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def linear(x: np.ndarray, p: Linear) -> np.ndarray:  # [T, in] -> [T, out]
    return x @ p.w + p.b


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One head: q, k, v [T, D], mask [T, T] -> (output [T, D], attention probabilities [T, T])."""
    probs = softmax(q @ k.T / np.sqrt(np.float32(q.shape[-1])) + mask)
    return probs @ v, probs


def mha(x: np.ndarray, p: Block, n_head: int) -> tuple[np.ndarray, np.ndarray]:
    """Multi-head causal self-attention: [T, E] -> ([T, E], probabilities [H, T, T])."""
    q, k, v = np.split(linear(x, p.c_attn), 3, axis=-1)  # [T, E] each
    mask = np.triu(np.full((len(x), len(x)), -np.inf, dtype=np.float32), k=1)  # no attending to the future
    heads = [attention(qh, kh, vh, mask)  # each head sees its own D columns
             for qh, kh, vh in zip(*(np.split(a, n_head, axis=-1) for a in (q, k, v)))]
    out = np.hstack([o for o, _ in heads])  # [T, E]
    return linear(out, p.attn_proj), np.stack([a for _, a in heads])


def mlp(x: np.ndarray, p: Block) -> np.ndarray:  # [T, E] -> [T, F] -> [T, E]
    return linear(gelu(linear(x, p.c_fc)), p.mlp_proj)


def transformer_block(x: np.ndarray, p: Block, config: GPT2Config) -> tuple[np.ndarray, np.ndarray]:
    """Pre-norm residual block: [T, E] -> ([T, E], attention probabilities [H, T, T])."""
    a, probs = mha(layer_norm(x, p.ln_1, config.layer_norm_epsilon), p, config.n_head)
    x = x + a
    x = x + mlp(layer_norm(x, p.ln_2, config.layer_norm_epsilon), p)
    return x, probs


class Trace(NamedTuple):
    """The inside of one forward pass over T tokens, as Hugging Face's GPT-2 names it.

    `hidden_states` [n_layer + 1, T, E]: the embeddings (token + position), then the output of each
    block, except that the last entry is the last block's output after the final layer norm `ln_f`
    (what the LM head reads). `attentions` [n_layer, H, T, T]: each head's softmax probabilities,
    row t over positions 0..t (zero above the diagonal; every row sums to 1). `logits` [T, V].
    """
    ids: np.ndarray
    hidden_states: np.ndarray
    attentions: np.ndarray
    logits: np.ndarray


def trace(params: Params, config: GPT2Config, ids: np.ndarray) -> Trace:
    """Run GPT-2 over `ids` (1..n_positions token ids), keeping every hidden state and attention."""
    x = params.wte[ids] + params.wpe[:len(ids)]  # [T, E]
    hidden, attentions = [x], []
    for block in params.blocks:
        x, probs = transformer_block(x, block, config)
        hidden.append(x)
        attentions.append(probs)
    hidden[-1] = layer_norm(x, params.ln_f, config.layer_norm_epsilon)
    logits = hidden[-1] @ params.wte.T  # [T, V]: the head is the token embedding matrix (tied)
    return Trace(np.asarray(ids), np.stack(hidden), np.stack(attentions), logits)


def forward(params: Params, config: GPT2Config, ids: np.ndarray) -> np.ndarray:
    """Logits [T, V] of every position: what `model.forward(..., all_logits=True)` computes fast."""
    return trace(params, config, ids).logits


def logit_lens(params: Params, config: GPT2Config, t: Trace, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The next token read from the residual stream after each layer: (ids, probabilities), each
    [n_layer + 1, T, k], the k most likely first. Each hidden state goes through `ln_f` and the
    tied head as if the model ended there (the last one has been through `ln_f` already)."""
    ids = np.empty(t.hidden_states.shape[:2] + (k,), dtype=np.int64)
    probs = np.empty(ids.shape, dtype=np.float32)
    for layer, h in enumerate(t.hidden_states):
        if layer < len(t.hidden_states) - 1:
            h = layer_norm(h, params.ln_f, config.layer_norm_epsilon)
        p = softmax(h @ params.wte.T)  # [T, V]
        top = np.argpartition(-p, k - 1, axis=-1)[:, :k] if k > 1 else np.argmax(p, axis=-1)[:, None]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(p, top, -1), axis=-1, kind="stable"), -1)
        ids[layer], probs[layer] = top, np.take_along_axis(p, top, axis=-1)
    return ids, probs
