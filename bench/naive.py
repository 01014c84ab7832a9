"""The baseline: GPT-2 in the style of picoGPT's gpt2.py, for `make bench` to compare against.

Full recompute of the whole sequence for every new token, no KV cache, full T×T attention with a
mask, GELU with temporaries. One change from the published code: the constants are float32, so
that NumPy 2 does not silently run it in float64 (which would make it about 6× slower still).
"""

import numpy as np

C = np.float32(np.sqrt(2 / np.pi))


def gelu(x):
    return 0.5 * x * (1 + np.tanh(C * (x + np.float32(0.044715) * x**3)))


def softmax(x):
    exp_x = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return exp_x / np.sum(exp_x, axis=-1, keepdims=True)


def layer_norm(x, g, b, eps: float = 1e-5):
    mean = np.mean(x, axis=-1, keepdims=True)
    variance = np.var(x, axis=-1, keepdims=True)
    x = (x - mean) / np.sqrt(variance + np.float32(eps))
    return g * x + b


def linear(x, w, b):
    return x @ w + b


def ffn(x, c_fc, c_proj):
    return linear(gelu(linear(x, **c_fc)), **c_proj)


def attention(q, k, v, mask):
    return softmax(q @ k.T / np.float32(np.sqrt(q.shape[-1])) + mask) @ v


def mha(x, c_attn, c_proj, n_head):
    x = linear(x, **c_attn)
    qkv = list(map(lambda x: np.split(x, n_head, axis=-1), np.split(x, 3, axis=-1)))
    causal_mask = ((1 - np.tri(x.shape[0], dtype=x.dtype)) * np.float32(-1e10))
    out_heads = [attention(q, k, v, causal_mask) for q, k, v in zip(*qkv)]
    return linear(np.hstack(out_heads), **c_proj)


def transformer_block(x, mlp, attn, ln_1, ln_2, n_head):
    x = x + mha(layer_norm(x, **ln_1), **attn, n_head=n_head)
    return x + ffn(layer_norm(x, **ln_2), **mlp)


def gpt2(inputs, wte, wpe, blocks, ln_f, n_head):
    x = wte[inputs] + wpe[range(len(inputs))]
    for block in blocks:
        x = transformer_block(x, **block, n_head=n_head)
    return layer_norm(x, **ln_f) @ wte.T


def params_from(weights: dict, n_layer: int) -> dict:
    """picoGPT's nested-dict parameters from model folder tensors (no copies)."""
    def lin(n):
        return {"w": weights[n + ".weight"], "b": weights[n + ".bias"]}

    def ln(n):
        return {"g": weights[n + ".weight"], "b": weights[n + ".bias"]}

    blocks = [{"attn": {"c_attn": lin(f"h.{i}.attn.c_attn"), "c_proj": lin(f"h.{i}.attn.c_proj")},
               "mlp": {"c_fc": lin(f"h.{i}.mlp.c_fc"), "c_proj": lin(f"h.{i}.mlp.c_proj")},
               "ln_1": ln(f"h.{i}.ln_1"), "ln_2": ln(f"h.{i}.ln_2")} for i in range(n_layer)]
    return {"wte": weights["wte.weight"], "wpe": weights["wpe.weight"], "blocks": blocks, "ln_f": ln("ln_f")}


def generate(inputs, params, n_head, n_tokens_to_generate):
    inputs = list(inputs)
    for _ in range(n_tokens_to_generate):
        logits = gpt2(inputs, **params, n_head=n_head)
        inputs.append(int(np.argmax(logits[-1])))
    return inputs[len(inputs) - n_tokens_to_generate:]
