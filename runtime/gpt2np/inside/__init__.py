"""What GPT-2 does with one prompt, as one self-contained HTML page: what `gpt-explain` writes and
gpt-serve's playground opens (both doors show this room's page; neither owns it).

`report` gathers the facts (tokenization, the generated tokens with their alternatives, every
attention map, the logit lens, the tensor shapes) from the runtime's own parts: the tokenizer's
`explain`, the engine's generation with `logprobs`, and the readable reference forward pass
(`GPT2.trace`). `page.render` turns them into HTML with everything inline (no network). Only the
standard library and NumPy: no extra.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np

from .. import reference
from ..api import GPT2
from ..constraint import Constraint
from ..errors import GPT2Error
from ..reference import Trace

TOP_ALTERNATIVES = 5
MAX_POSITIONS = 256  # prompt + new tokens: the page holds n_layer x n_head maps of T x T


def report(model: GPT2, prompt: str, n_tokens: int, **options) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready values. `options`: `GPT2.complete`'s options.
    Prompt and new tokens together may be at most `MAX_POSITIONS` (`GPT2Error` if not)."""
    tok, cfg = model.tokenizer, model.config
    pieces = tok.explain(prompt)
    prompt_ids = [i for p in pieces for i in p.ids] or model.prompt_ids(prompt)  # the core's rule for ""
    most = min(MAX_POSITIONS, cfg.n_positions)
    if len(prompt_ids) + n_tokens > most:
        raise GPT2Error(f"the prompt and the new tokens are {len(prompt_ids) + n_tokens} tokens; the page shows at "
                        f"most {most} (use a shorter prompt or a smaller -n)")
    gen = model.complete(prompt_ids, n_tokens, logprobs=TOP_ALTERNATIVES, **options)
    if gen.error:
        raise GPT2Error(gen.error)
    # The model sees the prompt and each generated token but the last (nothing reads that one yet).
    seen = (prompt_ids + gen.ids[:-1])[:cfg.n_positions]
    t = model.trace(seen)
    lens_ids, lens_probs = reference.logit_lens(model.params, cfg, t, k=1)
    token = tok.id_to_token.get
    T = len(seen)
    rows, cols = np.tril_indices(T)  # attention is zero above the diagonal: only the rest is sent
    return {
        "model": {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_positions": cfg.n_positions,
                  "vocab_size": cfg.vocab_size, "source": model.metadata.get("gpt2np.source", "")},
        "prompt": prompt,
        "pieces": [{"text": p.text, "byte_chars": p.byte_chars, "merges": [list(m) for m in p.merges],
                    "tokens": p.tokens, "ids": p.ids} for p in pieces],
        "prompt_ids": prompt_ids,
        "options": {k: v.as_dict() if isinstance(v, Constraint) else v for k, v in options.items() if v is not None},
        "generated": [{"id": i, "token": token(i, "?"), "text": text, "p": math.exp(lp),
                       "alternatives": [[a, token(a, "?"), math.exp(alp)] for a, alp in alts.items()]}
                      for i, text, lp, alts in zip(gen.ids, gen.token_texts, gen.logprobs, gen.top_logprobs)],
        "text": gen.text,  # what gpt-run prints: without a stop string or <|endoftext|>
        "stop_reason": gen.stop_reason,
        "tokens": [token(i, "?") for i in seen],
        "texts": [tok.decode([i]) for i in seen],
        # attention as bytes (probability x 255, rounded), lower triangle, row by row, head by head
        "attention": base64.b64encode(np.rint(t.attentions[..., rows, cols] * 255).astype(np.uint8).tobytes()).decode(),
        "lens": [[[token(int(i), "?"), round(float(p), 4)] for i, p in zip(ids[:, 0], probs[:, 0])]
                 for ids, probs in zip(lens_ids, lens_probs)],
        "shapes": shapes(model, t),
    }


def shapes(model: GPT2, t: Trace) -> list[list]:
    """(tensor, shape, what it is) from the ids to the logits: the weights' shapes as
    `GPT2Config.tensor_shapes()` defines them (the format's one definition; the first block's
    stand for every block), the activations' as the trace `t` holds them."""
    w = model.config.tensor_shapes()
    L, H, T, _ = t.attentions.shape
    E = t.hidden_states.shape[-1]
    F = w["h.0.mlp.c_fc.weight"][1]

    def weight(name: str, what: str) -> list:
        return [name.replace("h.0.", "h.i."), list(w[name]), what]

    return [
        ["ids", [T], "token ids of the prompt (and the tokens generated so far)"],
        weight("wte.weight", "token embeddings (weights; also the LM head)"),
        weight("wpe.weight", "position embeddings (weights)"),
        ["x = wte[ids] + wpe[:T]", list(t.hidden_states.shape[1:]), "the residual stream: hidden_states[0]"],
        [f"block i = 0..{L - 1}:", None, ""],
        ["  ln_1(x)", [T, E], f"layer norm (h.i.ln_1: {list(w['h.0.ln_1.weight'])})"],
        weight("h.0.attn.c_attn.weight", "Q, K and V projections in one matrix (weights)"),
        ["  q, k, v", [H, T, E // H], "split into heads"],
        ["  q @ kᵀ / √D + mask", list(t.attentions.shape[1:]), "attention scores; the mask hides the future"],
        ["  softmax(...)", list(t.attentions.shape[1:]), "attention probabilities: the heatmaps"],
        ["  softmax(...) @ v", [H, T, E // H], "each head's output"],
        ["  heads joined, c_proj", [T, E], f"h.i.attn.c_proj.weight {list(w['h.0.attn.c_proj.weight'])}; added to x"],
        ["  ln_2(x)", [T, E], "layer norm"],
        ["  c_fc, gelu", [T, F], f"h.i.mlp.c_fc.weight {list(w['h.0.mlp.c_fc.weight'])}"],
        ["  mlp c_proj", [T, E], f"h.i.mlp.c_proj.weight {list(w['h.0.mlp.c_proj.weight'])}; "
                                 "added to x: hidden_states[i + 1]"],
        ["ln_f(x)", list(t.hidden_states.shape[1:]), "final layer norm: the last of hidden_states"],
        ["logits = ln_f(x) @ wteᵀ", list(t.logits.shape), "next-token scores at every position"],
    ]
