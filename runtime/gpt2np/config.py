"""The model folder's `config.json` and the tensor layout it implies.

This module is the single written-down definition of the model format: `tensor_shapes` names every
tensor of `model.safetensors` and its shape for a given config. The converter writes exactly this and
the runtime loads exactly this, so neither can drift from the other.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import GPT2Error

# Bounds well above every published GPT-2 but low enough that a hostile config cannot make us
# allocate absurd amounts of memory before any check on the weights.
_LIMITS = {
    "vocab_size": 10_000_000,
    "n_positions": 1_048_576,
    "n_embd": 65_536,
    "n_layer": 1_024,
    "n_head": 1_024,
    "n_inner": 1_048_576,
}

# Hugging Face options that change the computation in ways this runtime does not implement.
_UNSUPPORTED = {
    "scale_attn_weights": (True, "attention scores not scaled by 1/sqrt(head_dim)"),
    "scale_attn_by_inverse_layer_idx": (False, "scale_attn_by_inverse_layer_idx"),
    "add_cross_attention": (False, "cross-attention (encoder-decoder GPT-2)"),
}


@dataclass(frozen=True)
class GPT2Config:
    """GPT-2's hyper-parameters, under Hugging Face's GPT2Config names."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    def __post_init__(self) -> None:
        for name, limit in _LIMITS.items():
            value = getattr(self, name)
            if name == "n_inner" and value is None:
                continue
            if type(value) is not int or not 1 <= value <= limit:
                raise GPT2Error(f"config: {name} must be an integer from 1 to {limit}, got {value!r}")
        if self.n_embd % self.n_head:
            raise GPT2Error(f"config: n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head})")
        eps = self.layer_norm_epsilon
        if type(eps) not in (int, float) or not (math.isfinite(eps) and 0 < eps < 1):
            raise GPT2Error(f"config: layer_norm_epsilon must be a number in (0, 1), got {eps!r}")
        if self.activation_function != "gelu_new":
            raise GPT2Error(
                f"config: activation_function {self.activation_function!r} is not supported "
                "(GPT-2 uses 'gelu_new', the tanh approximation)"
            )
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < self.vocab_size:
                raise GPT2Error(f"config: {name} must be a token id below vocab_size, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_bytes_per_position(self) -> int:
        """The keys and values one position keeps in a KV cache: every layer's, float32."""
        return 2 * self.n_layer * self.n_embd * 4

    @property
    def d_mlp(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of `model.safetensors`, in file order, with its shape.

        Names are Hugging Face's GPT-2 names without the `transformer.` prefix. Linear weights are
        [in, out] (Conv1D layout, as in OpenAI's checkpoint). The LM head is `wte` (tied).
        """
        E, F = self.n_embd, self.d_mlp
        shapes = {"wte.weight": (self.vocab_size, E), "wpe.weight": (self.n_positions, E)}
        for i in range(self.n_layer):
            h = f"h.{i}."
            shapes.update({
                h + "ln_1.weight": (E,), h + "ln_1.bias": (E,),
                h + "attn.c_attn.weight": (E, 3 * E), h + "attn.c_attn.bias": (3 * E,),
                h + "attn.c_proj.weight": (E, E), h + "attn.c_proj.bias": (E,),
                h + "ln_2.weight": (E,), h + "ln_2.bias": (E,),
                h + "mlp.c_fc.weight": (E, F), h + "mlp.c_fc.bias": (F,),
                h + "mlp.c_proj.weight": (F, E), h + "mlp.c_proj.bias": (E,),
            })
        shapes.update({"ln_f.weight": (E,), "ln_f.bias": (E,)})
        return shapes

    def to_dict(self) -> dict:
        """The Hugging Face `config.json` contents for this config."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "activation_function": self.activation_function,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "resid_pdrop": 0.1,
            "embd_pdrop": 0.1,
            "attn_pdrop": 0.1,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "use_cache": True,
        }

    @classmethod
    def from_dict(cls, d: object) -> "GPT2Config":
        """Read a Hugging Face GPT-2 config dict; refuse what this runtime cannot run."""
        if not isinstance(d, dict):
            raise GPT2Error("config: not a JSON object")
        if d.get("model_type", "gpt2") != "gpt2":
            raise GPT2Error(f"config: model_type {d.get('model_type')!r} is not 'gpt2'")
        for key, (expected, what) in _UNSUPPORTED.items():
            if key in d and d[key] != expected:
                raise GPT2Error(f"config: {what} is not supported ({key}={d[key]!r})")
        n_positions = d.get("n_positions", d.get("n_ctx"))
        if "n_ctx" in d and n_positions != d["n_ctx"]:
            raise GPT2Error(f"config: n_ctx ({d['n_ctx']!r}) differs from n_positions ({n_positions!r})")
        missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if k not in d]
        if n_positions is None:
            missing.append("n_positions")
        if missing:
            raise GPT2Error(f"config: missing {', '.join(missing)}")
        fields = dict(
            vocab_size=d["vocab_size"], n_positions=n_positions, n_embd=d["n_embd"],
            n_layer=d["n_layer"], n_head=d["n_head"], n_inner=d.get("n_inner"),
        )
        for key in ("layer_norm_epsilon", "activation_function", "bos_token_id", "eos_token_id"):
            if key in d:
                fields[key] = d[key]
        return cls(**fields)

    @classmethod
    def from_file(cls, path: str | Path) -> "GPT2Config":
        try:
            with open(path, "rb") as f:
                d = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise GPT2Error(f"{path}: not found") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise GPT2Error(f"{path}: not a valid JSON file ({e})") from None
        try:
            return cls.from_dict(d)
        except GPT2Error as e:
            raise GPT2Error(f"{path}: {e}") from None
