"""GPT-2's forward pass, fast: small functions over float32 NumPy arrays, with a KV cache and
batches of sequences in one pass. The memory the keys and values live in is `kv.py`'s.

`reference.py` is the same model written to read like the math (full recompute, one sequence,
nothing in place); the tests prove the two equal. This one differs only in how it computes:
keys and values are cached, prompts are read in blocks of query rows, and work is done in place
where it saves memory traffic; each function's docstring says what it modifies.

Shapes: N rows (the new positions of every sequence in the pass), T new positions of one
sequence, S = its positions so far (cache + new), E = n_embd, H = n_head, D = E / H, F = 4E,
V = vocab size. Every constant is float32 so that NumPy never silently promotes activations to
float64.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, NamedTuple

import numpy as np

from . import parallel
from .config import GPT2Config
from .kv import KVArena, KVCache
from .matmul import head_matmul, matmul
from .params import Block, LayerNorm, Linear, Params


_GELU_ROWS = 32  # gelu's scratch, [32, 3072] floats, fits in L2
_ATTENTION_BLOCK = 128  # query rows per block in long prompts: scores stay in cache
_ALL_HEADS_SCORES = 512 * 1024  # up to this many scores (2 MB) a block takes all heads at once
_SPLIT_SCORES = 2**21  # from this many scores, a prompt's attention goes in parts (`parallel`)
_SPLIT_ELEMENTS = 2**18  # from this many inputs, GELU and layer norm go in parts
_SPLIT_DECODE_SCORES = 2**13  # from this many scores, a decode group's attention goes in parts


def gelu(x: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:  # [N, F] -> the same array
    """GPT-2's GELU of x + b (b: a bias [F], or none), 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))),
    computed in place: x is overwritten.

    Uses 0.5·(1 + tanh(u)) = 1 / (1 + exp(−2u)), and −2u = x·(−2c − 2ca·x²): one transcendental,
    six more passes and no large temporaries. Goes 32 rows at a time so that the passes (and the
    bias, which the product before it leaves to this) stay in cache. For very negative x, exp
    overflows to inf and the result is the correct −0.
    """
    if x.size >= _SPLIT_ELEMENTS:  # a long prompt's: in parts, on every core (`parallel`)
        parallel.split(lambda rows: _gelu(x[rows], b), len(x))
        return x
    return _gelu(x, b)


_GELU_X0 = np.float32(-2 * np.sqrt(2.0 / np.pi))  # −2c
_GELU_X2 = np.float32(-2 * np.sqrt(2.0 / np.pi) * 0.044715)  # −2ca


def _gelu(x: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    u = np.empty((min(len(x), _GELU_ROWS), x.shape[1]), dtype=np.float32)
    with np.errstate(over="ignore"):  # exp overflows to inf on purpose (the state is per thread)
        for start in range(0, len(x), _GELU_ROWS):
            xs = x[start:start + _GELU_ROWS]
            if b is not None:
                xs += b
            us = np.multiply(xs, xs, out=u[:len(xs)])
            us *= _GELU_X2
            us += _GELU_X0
            us *= xs
            np.exp(us, out=us)
            us += np.float32(1)
            np.divide(xs, us, out=xs)
    return x


@lru_cache(maxsize=None)
def _mean_column(n: int) -> np.ndarray:
    return np.full((n, 1), 1.0 / n, dtype=np.float32)


def layer_norm(x: np.ndarray, p: LayerNorm, eps: float) -> np.ndarray:  # [N, E] -> new [N, E]
    """(x − mean) / √(var + eps) · g + b over the last axis (x is left as it is).

    The means are products with a column of 1/n: BLAS takes them faster than NumPy's reductions.
    A long prompt's rows go in parts, on every core (`parallel`).
    """
    if x.size < _SPLIT_ELEMENTS:
        return _layer_norm(x, p, eps, np.empty_like(x))
    out = np.empty_like(x)
    parallel.split(lambda rows: _layer_norm(x[rows], p, eps, out[rows]), len(x))
    return out


def _layer_norm(x: np.ndarray, p: LayerNorm, eps: float, xc: np.ndarray) -> np.ndarray:
    mean_of = _mean_column(x.shape[-1])
    np.subtract(x, x @ mean_of, out=xc)
    var = np.square(xc) @ mean_of
    var += np.float32(eps)
    xc /= np.sqrt(var, out=var)
    xc *= p.g
    xc += p.b
    return xc


def linear(x: np.ndarray, p: Linear) -> np.ndarray:  # [N, in] -> new [N, out]: x @ w + b
    y = matmul(x, p.w, p.packed)
    y += p.b
    return y


@lru_cache(maxsize=8)
def _causal_mask(rows: int) -> np.ndarray:
    """[rows, rows]: 0 on and below the diagonal, −inf above it (the future). Shared: read-only."""
    mask = np.triu(np.full((rows, rows), -np.inf, dtype=np.float32), k=1)
    mask.setflags(write=False)
    return mask


_SUMS_SAFE = (np.float32(1e-20), np.float32(1e20))  # unshifted exp row sums in here are exact (`_exp_rows`)
_ones = np.ones((1024, 1), dtype=np.float32)  # grown when a context is longer (`_exp_rows`)


def _exp_rows(scores: np.ndarray, shift: bool) -> np.ndarray | None:
    """exp(scores) in place, and each row's sum [..., 1]: softmax's numerators and denominators.

    softmax(s)·v = (e·v)/Σe for e = exp(s − c), with any c per row. Shifting by the row's max
    (`shift`) keeps every e ≤ 1 but costs two passes over the scores; c = 0 gives the same values
    (but for rounding) as long as no e overflows or every e underflows. Unshifted, a row's sum
    within 1e±20 proves that (its largest e is at least 1e-20/S, a normal float, and e·v cannot
    overflow); any other sum returns None, and the caller computes the scores again and shifts.
    The sums are a product with a column of ones: faster than NumPy's reduction."""
    global _ones
    if shift:
        scores -= scores.max(axis=-1, keepdims=True)
    with np.errstate(over="ignore"):  # inf is caught by the check below (the state is per thread)
        np.exp(scores, out=scores)
    n = scores.shape[-1]
    if n > len(_ones):
        _ones = np.ones((n, 1), dtype=np.float32)
    sums = scores @ _ones[:n]
    if shift or (_SUMS_SAFE[0] < sums.min() and sums.max() < _SUMS_SAFE[1]):  # NaN fails: then shifted
        return sums
    return None


def _exp_scores(scores_of: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The scores that `scores_of()` computes, exponentiated in place, and their row sums: unshifted
    where that is exact, else computed again and shifted by the row's max (`_exp_rows`)."""
    scores = scores_of()
    sums = _exp_rows(scores, shift=False)
    if sums is None:
        scores = scores_of()
        sums = _exp_rows(scores, shift=True)
    return scores, sums


def attention(q: np.ndarray, runs: list[tuple[np.ndarray, np.ndarray]], offset: int,
              out: np.ndarray | None = None) -> np.ndarray:
    """Causal attention for queries q [H, T, D] at positions offset..offset+T-1 -> [H, T, D],
    written into `out` when given (a view into the caller's [T, E] array). Reads only.

    softmax(q·kᵀ)·v, with q already scaled by 1/√D, over keys and values held in `runs`:
    (kT [H, D, S_i], v [H, S_i, D]) of consecutive positions, together every position up to
    offset+T; the last run holds the queries' own (the others are a shared prefix, read where
    it lies). Long prompts go in blocks of query rows, each against only the keys it can see, so
    the scores stay in cache. The softmax is normalised after the product with v: (e·v)/Σe is
    the same value and divides [rows, D] numbers instead of [rows, S] (`_exp_rows`).
    """
    H, T, D = q.shape
    out = np.empty((H, T, D), dtype=np.float32) if out is None else out
    before = sum(v.shape[1] for _, v in runs[:-1])  # positions in the shared runs
    kT, v = runs[-1]

    def scores_of(heads: slice, start: int, stop: int) -> np.ndarray:  # [heads, rows, visible]
        qb, visible = q[heads, start:stop], offset + stop
        if before:  # each run's scores into its columns of one array, for one softmax
            scores = np.empty((qb.shape[0], stop - start, visible), dtype=np.float32)
            at = 0
            for kT_i, v_i in runs[:-1]:
                np.matmul(qb, kT_i[heads], out=scores[:, :, at:at + v_i.shape[1]])
                at += v_i.shape[1]
            np.matmul(qb, kT[heads, :, :visible - before], out=scores[:, :, before:])
        else:
            scores = qb @ kT[heads, :, :visible]
        if stop - start > 1:  # the block's own keys include some in each row's future
            scores[:, :, offset + start:visible] += _causal_mask(stop - start)
        return scores

    for start in range(0, T, _ATTENTION_BLOCK):
        stop = min(start + _ATTENTION_BLOCK, T)
        visible = offset + stop
        # Many scores: one head at a time, so the block's scores stay in L2 through the passes
        # below. Few (decoding, or a short prompt tail): all heads in one product, as the call
        # overhead dominates.
        few = H * (stop - start) * visible <= _ALL_HEADS_SCORES
        for heads in [slice(0, H)] if few else [slice(h, h + 1) for h in range(H)]:
            scores, sums = _exp_scores(lambda: scores_of(heads, start, stop))
            block = np.matmul(scores[:, :, before:], v[heads, :visible - before], out=out[heads, start:stop])
            at = 0
            for _, v_i in runs[:-1]:
                block += scores[:, :, at:at + v_i.shape[1]] @ v_i[heads]
                at += v_i.shape[1]
            block /= sums
    return out


class Segment(NamedTuple):
    """Rows `rows` of the activations continue the sequence held in `cache`.

    A forward pass may carry several sequences at once (a batch): the weight matmuls serve all
    rows together, and attention, which each sequence does against its own cache, goes segment
    by segment (or, for sequences decoding one position each, in a `DecodeGroup`). `borrow` =
    (cache of an earlier segment, n): this sequence's first n positions are that one's, computed
    in this same pass, and are copied layer by layer just before they are needed (prompts that
    share a prefix compute it once, in one pass).
    """
    rows: slice
    cache: KVCache
    borrow: tuple[KVCache, int] | None = None


class DecodeGroup(NamedTuple):
    """Sequences that decode one position each, with caches in slots lo..hi−1 of one arena and
    no shared prefix: they attend together, in batched products over those slots' first S
    positions. A slot in the range but not in the group, and each slot's positions past its own,
    are padding that `mask` hides: at most as much again as the real work (`decode_groups`)."""
    arena: KVArena
    lo: int
    hi: int
    rows: np.ndarray  # each sequence's row in the activations
    slots: np.ndarray  # its slot − lo
    positions: np.ndarray  # the position it writes
    mask: np.ndarray  # [hi − lo, 1, 1, S]: 0 where a slot's query may look, −inf elsewhere


_DECODE_PADDING = 2  # a group computes at most this many times the scores it needs


def decode_groups(segments: list[Segment]) -> tuple[list[DecodeGroup], list[Segment]]:
    """Split a pass's segments into groups that attend together and the rest (one by one)."""
    by_arena: dict[int, list[Segment]] = {}
    rest = []
    for seg in segments:
        c = seg.cache
        if seg.rows.stop - seg.rows.start == 1 and c.slot is not None and not c.shared and seg.borrow is None:
            by_arena.setdefault(id(c.slot[0]), []).append(seg)
        else:
            rest.append(seg)
    groups = []
    for segs in by_arena.values():
        slots = np.array([s.cache.slot[1] for s in segs])
        positions = np.array([s.cache.length for s in segs])
        lo, hi, S = slots.min(), slots.max() + 1, positions.max() + 1
        if len(segs) < 2 or (hi - lo) * S > _DECODE_PADDING * (positions + 1).sum():
            rest += segs
            continue
        lengths = np.ones(hi - lo, dtype=np.int64)  # an idle slot's row looks at its first position
        lengths[slots - lo] = positions + 1
        mask = np.where(np.arange(S) < lengths[:, None], np.float32(0), np.float32(-np.inf))
        groups.append(DecodeGroup(segs[0].cache.slot[0], lo, hi, np.array([s.rows.start for s in segs]),
                                  slots - lo, positions, mask[:, None, None, :]))
    return groups, rest


def decode_attention(qkv: np.ndarray, group: DecodeGroup, layer: int, out: np.ndarray) -> None:
    """Write the group's new keys and values (from qkv [N, 3, H, D], queries scaled) into their
    slots, and their attention into their rows of `out` [N, E]: the same softmax(q·kᵀ)·v as
    `attention`, for every slot of the group's range in a few batched products per step. Many
    scores go in parts, on every core: reading the keys and values is most of the work, and
    each product of a batch is too small for OpenBLAS to share (64 sequences at context 512,
    124M: 8.3 ms a layer against 16.7)."""
    R, (_, _, H, D) = group.hi - group.lo, qkv.shape
    slots = group.slots + group.lo
    group.arena.k[slots, layer, :, group.positions] = qkv[group.rows, 1]
    group.arena.v[slots, layer, :, group.positions] = qkv[group.rows, 2]
    S = group.mask.shape[-1]
    k = group.arena.k[group.lo:group.hi, layer, :, :S]  # [R, H, S, D]
    v = group.arena.v[group.lo:group.hi, layer, :, :S]
    q = np.zeros((R, H, 1, D), dtype=np.float32)
    q[group.slots, :, 0] = qkv[group.rows, 0]
    heads = np.empty((R, H, 1, D), dtype=np.float32)

    def attend(r: slice) -> None:  # slots r of the range
        def scores_of() -> np.ndarray:  # [r, H, 1, S]
            scores = q[r] @ k[r].swapaxes(2, 3)
            scores += group.mask[r]
            return scores
        scores, sums = _exp_scores(scores_of)
        np.matmul(scores, v[r], out=heads[r])
        heads[r] /= sums
    if R * H * S < _SPLIT_DECODE_SCORES:
        attend(slice(0, R))
    else:
        parallel.split(attend, R)
    out[group.rows] = heads[group.slots].reshape(len(slots), H * D)


def mha(x: np.ndarray, p: Block, n_head: int, segments: list[Segment], layer: int,
        groups: list[DecodeGroup] = ()) -> np.ndarray:
    """Multi-head self-attention, [N, E] -> new [N, E]. Writes each sequence's new keys and values
    into its cache (at positions cache.length onwards; `transformer` advances the lengths after
    the last layer). The queries are scaled in place in the fresh Q, K, V product. `groups`
    attend together (`decode_attention`); each of `segments` attends alone, against its own
    cache: for short contexts that per-sequence work costs more than the attention itself, so
    this loop stays lean."""
    N, E = x.shape
    D = E // n_head
    qkv = matmul(x, p.c_attn.w, p.c_attn.packed).reshape(N, 3, n_head, D)  # one fused matmul for Q, K and V
    b, scale = p.c_attn.b.reshape(3, n_head, D), np.float32(1.0 / np.sqrt(D))

    def bias_and_scale(rows: slice) -> None:  # the queries of every segment scaled in one pass
        qkv[rows] += b
        qkv[rows, 0] *= scale
    if qkv.size < _SPLIT_ELEMENTS:
        bias_and_scale(slice(0, N))
    else:  # a long prompt's: in parts, on every core (`parallel`)
        parallel.split(bias_and_scale, N)
    out = np.empty((N, E), dtype=np.float32)
    for group in groups:
        decode_attention(qkv, group, layer, out)
    for rows, cache, borrow in segments:
        T, start = rows.stop - rows.start, cache.length
        own = start - cache.shared  # where the new positions go in the cache's own arrays
        k, v = cache.k[layer], cache.v[layer]
        if borrow is not None:  # the lender's segment came first: its positions of this layer are written
            lender, n = borrow  # the shared ones are the same runs (`Engine._lend`); the rest are copied
            k[:, :n - cache.shared] = lender.k[layer][:, :n - cache.shared]
            v[:, :n - cache.shared] = lender.v[layer][:, :n - cache.shared]
        q, new = qkv[rows, 0].transpose(1, 0, 2), qkv[rows].transpose(1, 2, 0, 3)  # [H, T, D], [3, H, T, D]
        # The heads' outputs land straight in their columns of `out`, [T, H·D] seen as [H, T, D].
        heads_out = out[rows].reshape(T, n_head, D).transpose(1, 0, 2)
        runs = [(p_kT[layer], p_v[layer]) for p_kT, p_v in cache.prefix]
        runs.append((cache.kT[layer][:, :, :own + T], v[:, :own + T]))

        def attend(h: slice) -> None:  # heads h: their new keys and values into the cache, then attention
            k[h, own:own + T], v[h, own:own + T] = new[1, h], new[2, h]
            attention(q[h], [(kT_i[h], v_i[h]) for kT_i, v_i in runs], start, out=heads_out[h])
        if n_head * T * (start + T) < _SPLIT_SCORES:
            attend(slice(0, n_head))
        else:  # a long prompt: its heads in parts, on every core (`parallel`)
            parallel.split(attend, n_head)
    return linear(out, p.attn_proj)


def mlp(x: np.ndarray, p: Block) -> np.ndarray:  # [N, E] -> [N, F] -> new [N, E]
    return linear(gelu(matmul(x, p.c_fc.w, p.c_fc.packed), p.c_fc.b), p.mlp_proj)  # gelu adds c_fc's bias


def transformer_block(x: np.ndarray, p: Block, config: GPT2Config, segments: list[Segment], layer: int,
                      groups: list[DecodeGroup] = ()) -> np.ndarray:
    """Pre-norm residual block, [N, E] -> new [N, E] (x itself is not changed; the caches are)."""
    eps = config.layer_norm_epsilon
    h = mha(layer_norm(x, p.ln_1, eps), p, config.n_head, segments, layer, groups)
    h += x  # the residual, into mha's fresh output (no new array)
    h += mlp(layer_norm(h, p.ln_2, eps), p)
    return h


def transformer(params: Params, config: GPT2Config, batch: list[tuple[np.ndarray, KVCache]],
                all_positions: bool | list[bool] = False,
                borrows: list[tuple[KVCache, int] | None] | None = None) -> list[np.ndarray]:
    """Run each sequence's new `ids` (the positions after those in its cache) through GPT-2.

    Extends every cache and returns, per sequence, the final hidden state (after ln_f) of its
    last position [1, E], or of every new position [T, E] with `all_positions` (one flag for
    all sequences, or one per sequence). `borrows`: per sequence, None or (the cache of an
    earlier sequence in the batch, n): its positions below n (its cache.length) are that
    sequence's, which this pass computes (see `Segment`).
    """
    if isinstance(all_positions, bool):
        all_positions = [all_positions] * len(batch)
    borrows = borrows or [None] * len(batch)
    segments, embeddings, row = [], [], 0
    for (ids, cache), borrow in zip(batch, borrows):
        start, T = cache.length, len(ids)
        if T == 0 or start + T > min(cache.capacity, config.n_positions):
            raise ValueError(f"{T} new positions after {start} do not fit the cache capacity "
                             f"({cache.capacity}) or the model's context ({config.n_positions})")
        embeddings.append(params.wte[ids] + params.wpe[start:start + T])
        segments.append(Segment(slice(row, row + T), cache, borrow))
        row += T
    x = np.concatenate(embeddings) if len(embeddings) > 1 else embeddings[0]
    groups, alone = decode_groups(segments)
    for layer, block in enumerate(params.blocks):
        x = transformer_block(x, block, config, alone, layer, groups)
    for rows, cache, _ in segments:
        cache.length += rows.stop - rows.start
    picked = [x[seg.rows] if every else x[seg.rows.stop - 1:seg.rows.stop] for seg, every in zip(segments, all_positions)]
    return [layer_norm(h, params.ln_f, config.layer_norm_epsilon) for h in picked]


def lm_head(params: Params, h: np.ndarray) -> np.ndarray:  # [N, E] -> [N, V]
    """Logits from final hidden states: the LM head is the token embedding matrix (tied).

    Row-major, as every later pass over them (log-normalizers, argmax, top alternatives) goes row
    by row (the seam's `head_matmul`)."""
    return head_matmul(h, params.wte, params.lm_head)


def forward(params: Params, config: GPT2Config, ids: np.ndarray, cache: KVCache,
            all_logits: bool = False) -> np.ndarray:
    """Run one sequence's new `ids` through GPT-2 and extend its cache.

    Returns the logits of the last position [V], or of every new position [T, V] with
    `all_logits`. Generation needs only the last: that saves a [T, E] x [E, V] product.
    """
    logits = lm_head(params, transformer(params, config, [(ids, cache)], all_positions=all_logits)[0])
    return logits if all_logits else logits[0]
