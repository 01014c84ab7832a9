"""The prefix cache: cached positions give what computed ones give, prefixes are computed once,
salts isolate, the byte budget holds."""

import numpy as np
import pytest

import gpt2np
from gpt2np import Options
from gpt2np.prefix_cache import BLOCK


def ids(rng, n):
    return [int(i) for i in rng.integers(0, 50257, n)]


def run(model, prompts, options, cache=None, salts=None, **engine):
    e = model.engine(prefix_cache=cache, **engine)
    seqs = [e.add(p, options, salt=(salts or [None] * len(prompts))[i]) for i, p in enumerate(prompts)]
    e.run()
    return [s.result for s in seqs], e


def multiple_choice(rng, context=45, choices=(2, 3, 5, 1)):
    ctx = ids(rng, context)
    return [ctx + ids(rng, k) for k in choices]


def test_cached_positions_give_what_computed_ones_give(model):
    """Four prompts sharing a 45-token context (a multiple-choice item), with and without the
    cache, and again on a warm cache: the same prompt log-probabilities (to 1e-5; the cached
    floats are those of the pass that computed them) and the same top alternatives."""
    prompts = multiple_choice(np.random.default_rng(0))
    scoring = Options(n_tokens=0, prompt_logprobs=3)
    cold, _ = run(model, prompts, scoring)
    cache = model.prefix_cache(64)
    for round in range(2):  # the second round reads every prompt's context from the warm cache
        warm, _ = run(model, prompts, scoring, cache)
        cached = [r.cached_tokens for r in warm]
        # The whole context but its last position: two full blocks and 13 positions of the
        # first prompt's third block, its partial last one.
        assert cached == [0, 44, 44, 44] if round == 0 else min(cached) >= 44
        for a, b in zip(cold, warm):
            assert len(a.prompt_logprobs) == len(b.prompt_logprobs) == len(a.prompt_ids)
            np.testing.assert_allclose(a.prompt_logprobs[1:], b.prompt_logprobs[1:], rtol=0, atol=1e-5)
            for x, y in zip(a.prompt_top_logprobs[1:], b.prompt_top_logprobs[1:]):
                assert list(x) == list(y) and np.allclose(list(x.values()), list(y.values()), atol=1e-5)
    assert cache.hits > 0 and cache.queries >= cache.hits


def test_a_tokens_value_is_its_top_entry_on_cached_positions(model):
    """lm-evaluation-harness compares a token's log-probability with its top entry by ==: on
    cached positions too."""
    rng = np.random.default_rng(1)
    ctx = ids(rng, 20)
    own = model.complete(ctx, 30, stop_at_eos=False).ids  # greedy tokens: each is its position's top
    cache = model.prefix_cache(64)
    for _ in range(2):
        (r,), _ = run(model, [ctx + own], Options(n_tokens=0, prompt_logprobs=1), cache)
        greedy = [(lp, top) for t, lp, top in zip(r.prompt_ids[21:], r.prompt_logprobs[21:], r.prompt_top_logprobs[21:])]
        assert all(top[t] == lp for (lp, top), t in zip(greedy, own[1:]))
    assert r.cached_tokens == len(ctx + own) - 1  # three full blocks and the partial last one, all but its last position


def test_generation_is_the_same_with_the_cache(model):
    prompts = multiple_choice(np.random.default_rng(2))
    greedy = Options(n_tokens=8, stop_at_eos=False)
    cold, _ = run(model, prompts, greedy)
    cache = model.prefix_cache(64)
    for _ in range(2):
        warm, _ = run(model, prompts, greedy, cache, prefill_chunk=7)
        assert [r.ids for r in warm] == [r.ids for r in cold]
        np.testing.assert_allclose([r.logprobs for r in warm], [r.logprobs for r in cold], atol=1e-5)
    sampled = Options(n_tokens=8, temperature=0.9, seed=3, stop_at_eos=False)
    assert [r.ids for r in run(model, prompts, sampled, cache)[0]] == [r.ids for r in run(model, prompts, sampled)[0]]


def test_sequences_admitted_together_compute_a_shared_prefix_once(model, monkeypatch):
    """The 4 prompts of one item, arriving together: the first computes the context, the others
    borrow it in the same pass and compute only their own part."""
    import gpt2np.engine as E

    rows, real = [], E.transformer
    monkeypatch.setattr(E, "transformer", lambda p, c, batch, **kw: rows.append(sum(len(i) for i, _ in batch))
                        or real(p, c, batch, **kw))
    prompts = multiple_choice(np.random.default_rng(3))
    results, e = run(model, prompts, Options(n_tokens=0, prompt_logprobs=1), model.prefix_cache(64))
    assert [r.cached_tokens for r in results] == [0, 44, 44, 44]  # the 45-token context but its last position
    assert sum(rows) == sum(map(len, prompts)) - 3 * 44
    assert len(rows) == 1  # one pass: the context and the three tails together
    # The context ends inside the first prompt's last full block: the others reuse its start.
    rows.clear()
    prompts = multiple_choice(np.random.default_rng(3), context=40, choices=(9, 9, 12))
    results, e = run(model, prompts, Options(n_tokens=0, prompt_logprobs=1), model.prefix_cache(64))
    assert [r.cached_tokens for r in results] == [0, 39, 39]
    assert sum(rows) == sum(map(len, prompts)) - 2 * 39 and len(rows) == 1
    # n samples of one prompt read it once as well
    same = [prompts[0]] * 3
    results, e = run(model, same, Options(n_tokens=2, temperature=1.0, seed=1), model.prefix_cache(64))
    assert [r.cached_tokens for r in results] == [0, 48, 48]


def test_a_lender_that_read_part_of_its_prefix_from_the_cache_lends_both_parts(model):
    """The cache holds the first 20 tokens of an item's context: its first prompt reads them in
    place and computes the rest; the others read those 19 in place too and borrow the rest from
    it in the same pass. Scores equal the cold ones."""
    prompts = multiple_choice(np.random.default_rng(9))
    scoring = Options(n_tokens=0, prompt_logprobs=2)
    cold, _ = run(model, prompts, scoring)
    cache = model.prefix_cache(64)
    run(model, [prompts[0][:20]], scoring, cache)
    warm, _ = run(model, prompts, scoring, cache)
    assert [r.cached_tokens for r in warm] == [19, 44, 44, 44]
    for a, b in zip(cold, warm):
        np.testing.assert_allclose(a.prompt_logprobs[1:], b.prompt_logprobs[1:], rtol=0, atol=1e-5)
        assert [list(t) for t in a.prompt_top_logprobs[1:]] == [list(t) for t in b.prompt_top_logprobs[1:]]


def test_different_salts_never_share(model):
    prompts = multiple_choice(np.random.default_rng(4))
    cache = model.prefix_cache(64)
    results, _ = run(model, prompts, Options(n_tokens=1), cache, salts=["a", "b", "a", None])
    # The whole 45-token context: a generating prompt that goes on past it does not need its last logits.
    assert [r.cached_tokens for r in results] == [0, 0, 45, 0]


def test_the_byte_budget_holds_and_the_least_recent_goes_first(model):
    per_block = 2 * model.config.n_layer * model.config.n_embd * 4 * BLOCK  # keys and values (no scores kept)
    cache = model.prefix_cache(per_block * 5.5 / 2**20)  # room for five blocks
    rng = np.random.default_rng(5)
    first = ids(rng, 3 * BLOCK + 1)
    run(model, [first], Options(n_tokens=1), cache)
    assert [len(b.ids) for b in cache.blocks.values()] == [BLOCK, BLOCK, BLOCK, 1]  # and the partial last block
    for _ in range(4):
        run(model, [ids(rng, 2 * BLOCK + 1)], Options(n_tokens=1), cache)
        assert cache.bytes <= cache.budget and sum(len(b.ids) == BLOCK for b in cache.blocks.values()) <= 5
        segments = {id(b.segment): b.segment for b in cache.blocks.values()}
        assert cache.bytes == sum(g.nbytes for g in segments.values()) + sum(b.stats_bytes for b in cache.blocks.values())
        assert sorted(k for ks in cache.children.values() for k in ks) == sorted(cache.blocks)
    (again,), _ = run(model, [first], Options(n_tokens=1), cache)
    assert again.cached_tokens == 0  # evicted: its blocks were the least recently used


def test_scoring_uses_the_cache(model):
    rng = np.random.default_rng(6)
    shared = ids(rng, 40)
    texts = [shared + ids(rng, k) for k in (5, 9, 3)]
    plain = model.score_batch(texts)
    cache = model.prefix_cache(64)
    for _ in range(2):
        cached = model.score_batch(texts, prefix_cache=cache)
        for a, b in zip(plain, cached):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert cache.hits >= 3 * (2 * BLOCK - 1)
    with pytest.raises(gpt2np.GPT2Error, match="prefix_cache"):
        model.engine(prefix_cache=-1)


def test_segments_are_freed_with_their_last_block_and_compacted_when_half_unused(model):
    """The blocks of one prompt share one allocation; the budget counts allocations, so a
    segment's survivors move out once more than half of it is unused, with their keys and values."""
    from gpt2np.prefix_cache import CachedBlock, KVSegment, block_key

    L, H, D = model.config.n_layer, model.config.n_head, model.config.head_dim
    rng = np.random.default_rng(8)
    segment = KVSegment(rng.standard_normal((L, H, D, 4 * BLOCK)).astype(np.float32),
                      rng.standard_normal((L, H, 4 * BLOCK, D)).astype(np.float32))
    cache = model.prefix_cache(64)
    keys, parent = [], b""
    for k in range(4):
        keys.append(block_key(parent, np.arange(k * BLOCK, (k + 1) * BLOCK)))
        cache.insert(CachedBlock(keys[-1], segment, k * BLOCK, BLOCK, None, None, parent, np.arange(BLOCK)))
        parent = keys[-1]
    assert cache.bytes == segment.nbytes  # four blocks, one allocation
    kept = [(segment.kT[..., 48:64].copy(), segment.v[:, :, 48:64].copy())]
    cache._remove(keys[0])
    assert cache.bytes == segment.nbytes  # three quarters still in use
    cache._remove(keys[1])  # half unused: the other two move to their own
    moved = [cache.blocks[k] for k in keys[2:]]
    assert all(b.segment is not segment and b.segment.nbytes == segment.nbytes // 4 for b in moved)
    assert cache.bytes == segment.nbytes // 2
    np.testing.assert_array_equal(moved[1].kT, kept[0][0])
    np.testing.assert_array_equal(moved[1].v, kept[0][1])
    cache._remove(keys[2])
    cache._remove(keys[3])
    assert cache.bytes == 0 and not cache.blocks and not cache.children


def test_a_prompt_is_cached_in_the_step_after_its_first_token(model):
    """The copy into the prefix cache is not on the way of a prompt's first token: the step that
    reads the prompt returns the token with the cache still empty; the next step (the engine is
    not idle until then) caches the prompt, and only then does the sequence's KV slot, which
    ended with that token, go back to the pool. A failure there fails a running sequence."""
    prompt = ids(np.random.default_rng(9), 3 * BLOCK + 5)
    e = model.engine(prefix_cache=64)
    s = e.add(prompt, Options(n_tokens=1, stop_at_eos=False))
    events = e.step()
    assert [ev.token for ev in events if ev.sequence is s and ev.token is not None] == s.result.ids
    assert s.done and not e.prefix_cache.blocks and s.cache is None and not e.idle
    assert not e.kv_pool.free or e.kv_pool.free[0] != (0, 0)  # its slot is kept for the copy
    assert e.step() == [] and e.idle
    assert len(e.prefix_cache.blocks) == 4 and (0, 0) in e.kv_pool.free
    again = e.add(prompt, Options(n_tokens=1, stop_at_eos=False))
    e.run()
    assert again.result.cached_tokens == len(prompt) - 1 and again.result.ids == s.result.ids

    broken = model.engine(prefix_cache=64)
    broken.prefix._insert = lambda seq, kv: 1 / 0  # the prefix cache manager inserts the prompt
    s = broken.add(prompt, Options(n_tokens=5, stop_at_eos=False))
    broken.run()
    assert s.result.stop_reason == "error" and "caching the prompt failed" in s.result.error
    assert len(broken.kv_pool.free) == broken.kv_pool.arenas[0].slots  # every slot back
