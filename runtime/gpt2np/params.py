"""The weights as both forward passes read them: `Params` of `Block`s of `Linear` and `LayerNorm`
(views into the memory-mapped file: nothing is copied). `model.py` (fast) and `reference.py`
(the math) both take these, and neither imports the other."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .config import GPT2Config


class Linear(NamedTuple):
    w: np.ndarray  # [in, out]
    b: np.ndarray  # [out]
    packed: Any = None  # w in a matmul backend's own layout (`gpt2np.matmul.prepare`), or None (replace it with w)


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
    lm_head: Any = None  # wteᵀ in a matmul backend's own layout, or None (replace it with wte)

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
