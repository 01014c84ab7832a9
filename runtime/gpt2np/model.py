"""GPT-2's forward pass as small pure functions over float32 NumPy arrays, with a KV cache.

Shapes: T new positions, S = positions so far (cache + new), E = n_embd, H = n_head, D = E / H.
Every constant is float32 so that NumPy never silently promotes activations to float64.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .config import GPT2Config


class Linear(NamedTuple):
    w: np.ndarray  # [in, out]
    b: np.ndarray  # [out]


class LayerNorm(NamedTuple):
    g: np.ndarray
    b: np.ndarray


class Block(NamedTuple):
    ln_1: LayerNorm
    c_attn: Linear  # fused Q, K, V projection: [E, 3E]
    attn_proj: Linear
    ln_2: LayerNorm
    c_fc: Linear
    mlp_proj: Linear


class Params(NamedTuple):
    wte: np.ndarray  # token embeddings [V, E], also the LM head (tied)
    wpe: np.ndarray  # position embeddings [n_positions, E]
    blocks: tuple[Block, ...]
    ln_f: LayerNorm

    @classmethod
    def from_weights(cls, w: dict[str, np.ndarray], config: GPT2Config) -> "Params":
        """Arrange tensors named as in `config.tensor_shapes()`; no data is copied."""
        def lin(name):
            return Linear(w[name + ".weight"], w[name + ".bias"])

        def ln(name):
            return LayerNorm(w[name + ".weight"], w[name + ".bias"])

        blocks = tuple(
            Block(ln(f"h.{i}.ln_1"), lin(f"h.{i}.attn.c_attn"), lin(f"h.{i}.attn.c_proj"),
                  ln(f"h.{i}.ln_2"), lin(f"h.{i}.mlp.c_fc"), lin(f"h.{i}.mlp.c_proj"))
            for i in range(config.n_layer)
        )
        return cls(w["wte.weight"], w["wpe.weight"], blocks, ln("ln_f"))


class KVCache:
    """Keys and values of every position processed so far, preallocated and written in place.

    `k` and `v` are [n_layer, H, capacity, D]; positions [0, length) are valid. np.empty does not
    touch the memory, so an unused capacity costs address space, not RAM.
    """

    def __init__(self, config: GPT2Config, capacity: int | None = None):
        capacity = config.n_positions if capacity is None else capacity
        shape = (config.n_layer, config.n_head, capacity, config.head_dim)
        self.k = np.empty(shape, dtype=np.float32)
        self.v = np.empty(shape, dtype=np.float32)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


_GELU_C = np.float32(np.sqrt(2.0 / np.pi))
_GELU_A = np.float32(0.044715)


def gelu(x: np.ndarray) -> np.ndarray:
    """GPT-2's GELU, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    return np.float32(0.5) * x * (np.float32(1) + np.tanh(_GELU_C * (x + _GELU_A * x * x * x)))


def layer_norm(x: np.ndarray, p: LayerNorm, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + np.float32(eps)) * p.g + p.b


def linear(x: np.ndarray, p: Linear) -> np.ndarray:
    return x @ p.w + p.b


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, offset: int) -> np.ndarray:
    """Causal attention of T queries at positions offset.. against S = offset + T keys: [H,T,D]."""
    T, S = q.shape[1], k.shape[1]
    scores = q @ k.transpose(0, 2, 1) * np.float32(1.0 / np.sqrt(q.shape[-1]))  # [H, T, S]
    # Query t sits at position offset + t and may see keys 0..offset + t.
    future = np.arange(S)[None, :] > (offset + np.arange(T))[:, None]
    scores[:, future] = -np.inf
    return softmax(scores) @ v


def mha(x: np.ndarray, p: Block, n_head: int, cache_k: np.ndarray, cache_v: np.ndarray,
        offset: int) -> np.ndarray:
    """Multi-head self-attention; appends this step's keys and values to the layer's cache."""
    T, E = x.shape
    qkv = linear(x, p.c_attn)  # one fused matmul for Q, K and V
    q, k, v = (qkv[:, i * E:(i + 1) * E].reshape(T, n_head, -1).transpose(1, 0, 2) for i in range(3))
    cache_k[:, offset:offset + T] = k
    cache_v[:, offset:offset + T] = v
    out = attention(q, cache_k[:, :offset + T], cache_v[:, :offset + T], offset)
    return linear(out.transpose(1, 0, 2).reshape(T, E), p.attn_proj)


def mlp(x: np.ndarray, p: Block) -> np.ndarray:
    return linear(gelu(linear(x, p.c_fc)), p.mlp_proj)


def transformer_block(x: np.ndarray, p: Block, config: GPT2Config, cache: KVCache, layer: int) -> np.ndarray:
    eps = config.layer_norm_epsilon
    x = x + mha(layer_norm(x, p.ln_1, eps), p, config.n_head, cache.k[layer], cache.v[layer], cache.length)
    return x + mlp(layer_norm(x, p.ln_2, eps), p)


def forward(params: Params, config: GPT2Config, ids: np.ndarray, cache: KVCache,
            all_logits: bool = False) -> np.ndarray:
    """Run `ids` (the next positions after those in `cache`) through GPT-2 and extend the cache.

    Returns the logits of the last position [V], or of every new position [T, V] with
    `all_logits`. Generation needs only the last: that saves a [T, E] x [E, V] product.
    """
    start, T = cache.length, len(ids)
    if start + T > cache.capacity:
        raise ValueError(f"{start + T} positions exceed the cache capacity of {cache.capacity}")
    x = params.wte[ids] + params.wpe[start:start + T]
    for layer, block in enumerate(params.blocks):
        x = transformer_block(x, block, config, cache, layer)
    cache.length = start + T
    if not all_logits:
        x = x[-1:]
    logits = layer_norm(x, params.ln_f, config.layer_norm_epsilon) @ params.wte.T
    return logits if all_logits else logits[0]
