"""The NumPy model against an independent TensorFlow GPT-2, and the KV cache against full recompute."""

import numpy as np
import pytest

import gpt2np
from gpt2np import kv, model as M
from conftest import HPARAMS_124M, SMALL_HPARAMS, write_model_dir

tf_reference = pytest.importorskip("helpers.tf_reference")

PROMPT = "The quick brown fox jumps over the lazy dog. Ünïcödé, 日本語, and emoji 🙂!"


def assert_close(actual, expected, atol=2e-5):
    """Agreement to float32 precision: differences of the order of float32 rounding of the sums."""
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    err = float(np.max(np.abs(actual - expected)))
    print(f"max abs logit difference {err:.3g}")
    scale = max(1.0, float(np.max(np.abs(expected))))
    assert err <= atol * scale, f"max abs difference {err:.3g} (logit scale {scale:.3g})"


def test_logits_match_tensorflow_at_every_position(small_model_dir, small_weights):
    model = gpt2np.load(small_model_dir)
    ids = model.encode(PROMPT)
    assert len(ids) > 20
    assert_close(model.logits(ids), tf_reference.logits(small_weights, SMALL_HPARAMS, ids))


def test_greedy_continuation_matches_tensorflow_step_by_step(small_model_dir, small_weights):
    model = gpt2np.load(small_model_dir)
    ids = model.encode("Once upon a time")
    n = SMALL_HPARAMS["n_ctx"] - len(ids)  # fill the whole context
    expected, expected_logits = tf_reference.greedy(small_weights, SMALL_HPARAMS, ids, n)
    got = list(model.generate_ids(ids, n, stop_at_eos=False))
    assert got == expected
    assert len(set(got)) > 3, "degenerate test model: the continuation should vary"
    # Each step's cached logits equal the reference's full recompute.
    cache = kv.KVCache(model.config, len(ids) + n)
    step_logits = [M.forward(model.params, model.config, np.array(ids), cache)]
    for token in got[:-1]:
        step_logits.append(M.forward(model.params, model.config, np.array([token]), cache))
    assert_close(np.stack(step_logits), expected_logits)


def test_kv_cache_equals_full_recompute(small_model_dir):
    model = gpt2np.load(small_model_dir)
    ids = model.encode(PROMPT)
    full = model.logits(ids)
    # Feed the same tokens in uneven chunks through one cache.
    cache, rows, start = kv.KVCache(model.config), [], 0
    for size in (5, 1, 1, 7, len(ids)):
        chunk = ids[start:start + size]
        if not chunk:
            break
        rows.append(M.forward(model.params, model.config, np.array(chunk), cache, all_logits=True))
        start += len(chunk)
    assert cache.length == len(ids)
    np.testing.assert_allclose(np.concatenate(rows), full, rtol=0, atol=1e-5 * max(1, np.abs(full).max()))


def test_a_shared_prefix_read_in_place_equals_own_positions(small_model_dir):
    """A cache that begins with runs of another array's positions (`KVCache.share`, as a prefix
    cache hit reads them) gives the logits of one that computed them, in prompt blocks and in
    decode steps; `positions` reads them back across the runs."""
    model = gpt2np.load(small_model_dir)
    P, C = model.params, model.config
    ids = np.array((model.encode(PROMPT) * 3)[:C.n_positions])
    full = kv.KVCache(C, len(ids))
    expected = M.forward(P, C, ids, full, all_logits=True)
    n = len(ids) - 9
    runs = [(full.kT[..., a:b].copy(), full.v[:, :, a:b].copy()) for a, b in ((0, 5), (5, 6), (6, n))]
    cache = kv.KVCache(C, len(ids) - n)
    cache.share(runs)
    assert (cache.length, cache.shared, cache.capacity) == (n, n, len(ids))
    got = np.concatenate([M.forward(P, C, ids[n:n + 6], cache, all_logits=True),
                          *(M.forward(P, C, ids[j:j + 1], cache, all_logits=True) for j in range(n + 6, len(ids)))])
    np.testing.assert_allclose(got, expected[n:], rtol=0, atol=1e-5 * max(1, np.abs(expected).max()))
    kT, v = cache.positions(3, len(ids))  # the shared ones as they are, the own ones as computed again
    np.testing.assert_array_equal(kT[..., :n - 3], full.kT[..., 3:n])
    np.testing.assert_array_equal(v[:, :, :n - 3], full.v[:, :, 3:n])
    np.testing.assert_allclose(kT[..., n - 3:], full.kT[..., n:len(ids)], rtol=0, atol=1e-4)
    np.testing.assert_allclose(v[:, :, n - 3:], full.v[:, :, n:len(ids)], rtol=0, atol=1e-4)
    assert [r[1].shape[2] for r in kv.first_positions(runs, 5 + 1 + 2)] == [5, 1, 2]


@pytest.mark.parametrize("in_parts", [False, True])
def test_sequences_decoding_together_in_arena_slots_equal_each_alone(small_model_dir, monkeypatch, in_parts):
    """Sequences of different lengths in slots of one arena, with an idle slot between them,
    decode in one batched attention (`DecodeGroup`; its slots in parts on every core, or in one
    part) and give each one's logits alone; a slot's earlier sequence leaves no trace; a
    sequence with a shared prefix and a prompt in the same pass attend alone."""
    splits = []
    if in_parts:
        real_split = M.parallel.split
        monkeypatch.setattr(M, "_SPLIT_DECODE_SCORES", 1)
        monkeypatch.setattr(M.parallel, "split", lambda work, n: splits.append(n) or real_split(work, n))
    model = gpt2np.load(small_model_dir)
    P, C = model.params, model.config
    ids = model.encode(PROMPT)
    prompts = [ids[:5], ids[3:12], ids[:8], ids[7:17]]
    pool = kv.KVPool(C, 2**30)
    caches = [pool.take(32) for _ in range(5)]
    M.transformer(P, C, [(np.array(ids[:20]), caches[1])])
    pool.give(caches[1])
    pool.give(caches[3])
    caches[1] = pool.take(32)  # slot 1 again, holding the earlier sequence's positions
    del caches[3]  # slot 3 stays idle, between the others
    assert [c.slot[1] for c in caches] == [0, 1, 2, 4]
    grouped = []
    real = M.decode_groups
    monkeypatch.setattr(M, "decode_groups", lambda segs: grouped.append(real(segs)) or grouped[-1])
    for prompt, cache in zip(prompts, caches):
        M.transformer(P, C, [(np.array(prompt), cache)])
    alone = [kv.KVCache(C, 32) for _ in prompts]
    for prompt, cache in zip(prompts, alone):
        M.forward(P, C, np.array(prompt), cache)
    shared = kv.KVCache(C, 32)
    shared.share([(alone[0].kT[..., :4].copy(), alone[0].v[:, :, :4].copy())])
    M.forward(P, C, np.array(prompts[0][4:]), shared)
    for step in range(3):
        tokens = [np.array([(31 * step + 7 * i) % C.vocab_size]) for i in range(len(prompts))]
        grouped.clear()
        hidden = M.transformer(P, C, [(t, c) for t, c in zip(tokens, caches)] + [(tokens[0], shared)]
                               + [(np.array(ids[:3]), kv.KVCache(C, 8))])
        groups, rest = grouped[0]
        assert [len(g.rows) for g in groups] == [4] and len(rest) == 2
        got = M.lm_head(P, np.concatenate(hidden[:5]))
        expected = np.stack([M.forward(P, C, t, c) for t, c in zip(tokens, alone)])
        np.testing.assert_allclose(got, expected[[0, 1, 2, 3, 0]], rtol=0, atol=1e-5 * max(1, np.abs(expected).max()))
    assert splits.count(5) == (3 * C.n_layer if in_parts else 0)  # slots 0..4 of the range, every layer


@pytest.mark.parametrize("scale", [1.0, 400.0, -400.0])
def test_attention_is_the_softmax_at_any_score_scale(scale, monkeypatch):
    """Softmax's exponentials go unshifted where that is exact (ordinary scores) and are shifted
    by the row's max where unshifted ones would overflow (scores in the hundreds) or all vanish
    (every score of a row far below zero): either way the result is the float64 softmax's."""
    rng = np.random.default_rng(1)
    H, T, S, D = 3, 6, 10, 8
    q = np.abs(rng.standard_normal((H, T, D), dtype=np.float32)) * np.float32(scale / D)
    k = np.abs(rng.standard_normal((H, S, D), dtype=np.float32))
    v = rng.standard_normal((H, S, D), dtype=np.float32)
    shifts = []
    real = M._exp_rows
    monkeypatch.setattr(M, "_exp_rows", lambda scores, shift: shifts.append(shift) or real(scores, shift))
    got = M.attention(q, [(k.swapaxes(1, 2), v)], S - T)
    scores = q.astype(np.float64) @ k.swapaxes(1, 2).astype(np.float64)
    scores[:, np.arange(T)[:, None] < np.arange(S)[None, :] - (S - T)] = -np.inf  # the future
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    expected = weights / weights.sum(axis=-1, keepdims=True) @ v
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert shifts == ([False] if scale == 1 else [False, True])
    if scale < 0:
        assert (scores.max(axis=-1) < -104).any()  # exp underflows to zero for every key of a row


def test_a_pool_gives_freed_slots_back_to_the_system_beyond_its_budget(small_model_dir):
    model = gpt2np.load(small_model_dir)
    C = model.config
    per_position = 2 * C.n_layer * C.n_embd * 4
    pool = kv.KVPool(C, 10 * per_position)
    a, b = pool.take(20), pool.take(20)
    for cache in (a, b):
        M.transformer(model.params, C, [(np.arange(8), cache)])
        cache.k[...] = 1.0  # every page of the slot's keys touched
        pool.give(cache)
    assert pool.touched == {(0, 0): 8}  # the second slot (8 more positions) went over the budget
    assert not b.k.any() and a.k.all()  # its pages went back: they read as zeros


def test_every_intermediate_is_float32(small_model_dir, monkeypatch):
    model = gpt2np.load(small_model_dir)
    seen = []
    for name in ("layer_norm", "gelu", "linear", "attention", "mha", "mlp", "transformer_block"):
        fn = getattr(M, name)

        def spy(*args, _fn=fn, _name=name, **kw):
            out = _fn(*args, **kw)
            seen.append((_name, out.dtype))
            return out
        monkeypatch.setattr(M, name, spy)
    model.logits(model.encode("float32 all the way"))
    assert {n for n, _ in seen} >= {"layer_norm", "gelu", "linear", "attention", "mha", "mlp"}
    assert all(d == np.float32 for _, d in seen), [x for x in seen if x[1] != np.float32]


def test_hugging_face_folder_runs_the_same(tmp_path, small_model_dir, small_weights):
    hf_dir = write_model_dir(tmp_path / "hf", SMALL_HPARAMS, small_weights, hf_style=True)
    ids = gpt2np.load(small_model_dir).encode(PROMPT)
    np.testing.assert_array_equal(gpt2np.load(hf_dir).logits(ids), gpt2np.load(small_model_dir).logits(ids))


def test_real_124M_shape_matches_tensorflow(weights_124M, model_124M_dir):
    weights = weights_124M
    model = gpt2np.load(model_124M_dir)
    p = model.params
    in_blocks = sum(a.size for block in p.blocks for layer in block for a in layer if isinstance(a, np.ndarray))
    n_params = p.wte.size + p.wpe.size + in_blocks + p.ln_f.g.size + p.ln_f.b.size
    assert n_params == 124_439_808  # GPT-2 small, as published
    ids = model.encode(PROMPT)
    assert_close(model.logits(ids), tf_reference.logits(weights, HPARAMS_124M, ids))
    got = list(model.generate_ids(ids, 4, stop_at_eos=False))
    expected, _ = tf_reference.greedy(weights, HPARAMS_124M, ids, 4)
    assert got == expected


def test_forward_refuses_positions_beyond_the_context(small_model_dir):
    model = gpt2np.load(small_model_dir)
    n = model.config.n_positions
    cache = kv.KVCache(model.config, n + 10)  # a cache larger than the model's context
    M.forward(model.params, model.config, np.arange(n), cache)
    with pytest.raises(ValueError, match="context"):
        M.forward(model.params, model.config, np.array([1]), cache)


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 15, 100, 127, 128, 130])
def test_matmul_pads_rows_without_changing_a_value(rows):
    """Rows padded to a multiple of 8 give each row what the unpadded product gives it."""
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 96), dtype=np.float32)
    w = rng.standard_normal((96, 40), dtype=np.float32)
    y = M.matmul(x, w)
    assert y.shape == (rows, 40) and y.dtype == np.float32
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.astype(np.float64), rtol=1e-5, atol=1e-4)
