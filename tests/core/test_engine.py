"""The one decode loop: continuous batching, chunked prompts, per-sequence options and errors."""


import numpy as np
import pytest

import gpt2np
from gpt2np import Event, GPT2Error, Options
from helpers.sampling_reference import log_softmax


PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog again and again", "日本語",
           "x", "Once upon a time there was", "1 2 3 4 5 6 7 8 9 10 11 12"]


def run(engine):
    log = []
    for seq, token, text, token_text, _ in engine.events():
        log.append((seq.tag, token, text))
    return log


@pytest.mark.parametrize("max_batch, chunk", [(1, None), (2, 3), (3, 1), (None, 5)])
def test_any_batching_and_chunking_gives_the_single_results(model, max_batch, chunk):
    opts = Options(n_tokens=12, stop_at_eos=False)
    engine = model.engine(max_batch=max_batch, prefill_chunk=chunk)
    seqs = [engine.add(model.encode(p), opts, tag=i) for i, p in enumerate(PROMPTS)]
    widest = 0
    while not engine.idle:
        engine.step()
        widest = max(widest, len(engine.running))
    assert max_batch is None or widest <= max_batch
    singles = [model.complete(p, 12, stop_at_eos=False) for p in PROMPTS]
    assert [s.result.ids for s in seqs] == [g.ids for g in singles]
    assert [s.result.text for s in seqs] == [g.text for g in singles]


@pytest.fixture
def positions_per_pass(monkeypatch):
    """The number of positions of each sequence in every forward pass the engine runs."""
    seen = []
    real = gpt2np.engine.transformer

    def spy(params, config, batch, all_positions=False, **kw):
        seen.append([len(ids) for ids, _ in batch])
        return real(params, config, batch, all_positions, **kw)

    monkeypatch.setattr(gpt2np.engine, "transformer", spy)
    return seen


def test_prefill_chunk_bounds_the_positions_per_step(model, positions_per_pass):
    seen = positions_per_pass
    engine = model.engine(prefill_chunk=4)
    running = engine.add(model.encode("a"), Options(n_tokens=20, stop_at_eos=False))
    engine.step()  # the short prompt is read; it now decodes one token per step
    long = engine.add(list(range(100, 140)), Options(n_tokens=3, stop_at_eos=False))
    engine.run()
    # While the 40-token prompt is read in chunks of 4, the running sequence gets a token every step.
    assert seen[1:11] == [[1, 4]] * 10
    assert len(running.result.ids) == 20 and len(long.result.ids) == 3
    assert long.result.ids == model.complete(list(range(100, 140)), 3, stop_at_eos=False).ids


def test_prefill_chunk_is_shared_by_every_prompt_being_read(model, positions_per_pass):
    seen = positions_per_pass
    engine = model.engine(prefill_chunk=5)
    opts = Options(n_tokens=2, stop_at_eos=False)
    seqs = [engine.add(list(range(100, 100 + n)), opts) for n in (11, 7, 1)]
    engine.run()
    # Prompt positions never exceed 5 per step, a 1-token remainder included; prompts are read
    # in order of arrival, and a sequence that has started decoding adds its one position.
    assert seen == [[5], [5], [1, 4], [1, 3, 1], [1, 1]]
    for s, n in zip(seqs, (11, 7, 1)):
        assert s.result.ids == model.complete(list(range(100, 100 + n)), 2, stop_at_eos=False).ids


def test_max_batched_tokens_bounds_every_pass_and_decoding_comes_first(model, positions_per_pass):
    seen = positions_per_pass
    engine = model.engine(max_batched_tokens=6)
    a = engine.add(list(range(100, 104)), Options(n_tokens=12, stop_at_eos=False))
    engine.step()  # a lone 4-token prompt fits: read whole
    b = engine.add(list(range(200, 215)), Options(n_tokens=3, stop_at_eos=False))
    c = engine.add(list(range(300, 303)), Options(n_tokens=2, stop_at_eos=False))
    engine.run()
    assert seen[0] == [4]
    # a decodes (one position); the prompts share the other 5 in order of arrival, then decode too.
    assert seen[1:5] == [[1, 5], [1, 5], [1, 5], [1, 1, 3]]
    assert all(sum(p) <= 6 for p in seen)
    for s, ids, n in ((a, range(100, 104), 12), (b, range(200, 215), 3), (c, range(300, 303), 2)):
        assert s.result.ids == model.complete(list(ids), n, stop_at_eos=False).ids


class FakeClock:
    """A step's time as a cost model: `decode` seconds plus `per_token` per prompt token read."""

    def __init__(self, decode=0.020, per_token=0.002):
        self.now, self.decode, self.per_token = 0.0, decode, per_token

    def perf_counter(self):
        return self.now


def test_prefill_stall_reads_a_lone_prompt_whole_and_paces_one_that_joins(model, positions_per_pass, monkeypatch):
    seen, clock = positions_per_pass, FakeClock()
    real_spy = gpt2np.engine.transformer

    def timed(params, config, batch, all_positions=False, **kw):
        # the pass the pacer times: decoding rows cost `decode`, each prompt row `per_token` more
        clock.now += clock.decode + clock.per_token * sum(len(ids) for ids, _ in batch if len(ids) > 1)
        return real_spy(params, config, batch, all_positions, **kw)

    monkeypatch.setattr(gpt2np.engine, "transformer", timed)
    monkeypatch.setattr(gpt2np.engine, "time", clock)
    engine = model.engine(max_batched_tokens=2048, prefill_stall=2.5)
    lone = engine.add(list(range(1000, 1050)), Options(n_tokens=62, stop_at_eos=False))
    engine.step()
    assert seen == [[50]]  # nothing decodes: the whole prompt in one pass
    for _ in range(5):
        engine.step()  # decoding alone: the pacer learns a decode step's time
    joining = engine.add(list(range(2000, 2058)), Options(n_tokens=1, stop_at_eos=False))
    while not joining.done:
        engine.step()
    chunks = [p[1] for p in seen[6:]]
    # The first chunks are the pacer's start (16): the first step, which also began the prompt
    # (its new cache's page faults), teaches nothing. Then it knows that a token adds 2 ms to a
    # 20 ms step and reads (2.5 - 1) x 20 / 2 = 15 tokens per step: 2.5 decode steps each.
    assert chunks == [16, 16, 15, 11] and sum(chunks) == 58
    assert lone.result.ids[:10] == model.complete(list(range(1000, 1050)), 10, stop_at_eos=False).ids
    assert joining.result.ids == model.complete(list(range(2000, 2058)), 1, stop_at_eos=False).ids


def test_prefill_pacer():
    from gpt2np.engine import PrefillPacer

    p = PrefillPacer(3.0)
    assert p.chunk() == PrefillPacer.START  # nothing measured yet
    p.observe(4, 0, 0.050)  # decoding only: 50 ms
    assert p.chunk() == PrefillPacer.START
    p.observe(4, 16, 0.050 + 16 * 0.001)  # 16 prompt tokens added 1 ms each
    assert p.chunk() == 32  # would fit (3 - 1) x 50 / 1 = 100, but grows at most 2x a step
    p.observe(4, 32, 0.050 + 32 * 0.001)
    assert p.chunk() == 64
    p.observe(4, 64, 0.050 + 64 * 0.001)
    assert p.chunk() == 100
    p.observe(4, 100, 0.050 + 100 * 0.010)  # tokens got 10x dearer (say, a long context)
    assert p.chunk() == int(2 * 0.050 / (0.001 + 0.25 * 0.009))  # the average moves a quarter of the way
    for _ in range(40):
        p.observe(4, 5, 0.050 + 5 * 0.5)
    assert p.chunk() == PrefillPacer.MIN  # never below MIN: a prompt always moves
    p.observe(0, 500, 0.5)  # a step with no decoding says nothing about how prompt tokens slow decoding
    assert p.chunk() == PrefillPacer.MIN
    q = PrefillPacer(3.0)
    q.observe(4, 0, 0.050)
    q.observe(4, 16, 0.050 + 16 * 0.001)
    q.observe(4, 3, 5.0, full=False)  # the end of a prompt: its one-off costs are not the tokens'
    assert q.chunk() == 32
    with pytest.raises(ValueError):
        PrefillPacer(1.0)


def test_new_sequences_join_between_steps_and_finished_ones_leave(model):
    engine = model.engine(max_batch=2)
    a = engine.add(model.encode("a"), Options(n_tokens=2, stop_at_eos=False))
    b = engine.add(model.encode("b"), Options(n_tokens=6, stop_at_eos=False))
    c = engine.add(model.encode("c"), Options(n_tokens=3, stop_at_eos=False))
    engine.step()
    assert engine.running == [a, b] and list(engine.waiting) == [c]
    engine.step()  # a is done after its second token
    assert a.done and engine.running == [b]
    engine.step()
    assert engine.running == [b, c]
    engine.run()
    assert [len(s.result.ids) for s in (a, b, c)] == [2, 6, 3]


def test_one_bad_prompt_never_fails_the_others(model):
    results = model.generate_batch(["fine", [1, 50257], list(range(70)), "also fine"], 5, stop_at_eos=False)
    assert [r.stop_reason for r in results] == ["length", "error", "error", "length"]
    assert "outside the vocabulary" in results[1].error and "context is 64" in results[2].error
    assert results[3].ids == model.complete("also fine", 5, stop_at_eos=False).ids
    with pytest.raises(GPT2Error, match="outside the vocabulary"):
        model.complete([1, 50257], 5)


def test_a_failure_inside_a_step_fails_only_its_sequence(model, monkeypatch):
    engine = model.engine()
    good = engine.add(model.encode("good"), Options(n_tokens=4, stop_at_eos=False))
    bad = engine.add(model.encode("bad"), Options(n_tokens=4, stop_at_eos=False))

    def broken(logits, norm=None):
        raise FloatingPointError("injected")

    monkeypatch.setattr(bad, "accept", broken)
    engine.run()
    assert bad.result.stop_reason == "error" and "injected" in bad.result.error
    assert good.result.ids == model.complete("good", 4, stop_at_eos=False).ids


def test_failures_in_admission_or_the_lm_head_fail_only_their_sequences(model, monkeypatch):
    engine = model.engine()
    good = engine.add(model.encode("good"), Options(n_tokens=4, stop_at_eos=False))
    bad = engine.add(model.encode("bad"), Options(n_tokens=4, stop_at_eos=False))

    def no_memory():
        raise MemoryError("injected")

    monkeypatch.setattr(bad, "admit", no_memory)
    events = engine.step()
    assert Event(bad, reason="error") in events and "allocating its cache failed: MemoryError" in bad.result.error
    engine.run()
    assert good.result.ids == model.complete("good", 4, stop_at_eos=False).ids
    # A failing LM head fails the sequences of that pass, and the engine goes on.
    engine = model.engine()
    seqs = [engine.add(model.encode(p), Options(n_tokens=3, stop_at_eos=False)) for p in ("a", "b")]
    monkeypatch.setattr(gpt2np.engine, "lm_head", lambda params, h: 1 / 0)
    events = engine.step()
    assert [e[0] for e in events] == seqs and all("ZeroDivisionError" in s.result.error for s in seqs)
    assert engine.idle


def test_cancel_leaves_at_the_next_step(model):
    engine = model.engine()
    keep = engine.add(model.encode("keep"), Options(n_tokens=8, stop_at_eos=False))
    gone = engine.add(model.encode("gone"), Options(n_tokens=8, stop_at_eos=False))
    engine.step()
    gone.cancel()
    events = engine.step()
    assert Event(gone, reason="cancelled") in events and gone.result.stop_reason == "cancelled"
    assert engine.running == [keep] and len(gone.result.ids) == 1 and gone.cache is None
    engine.run()
    assert keep.result.ids == model.complete("keep", 8, stop_at_eos=False).ids


def test_prompt_logprobs_equal_the_logits_even_in_chunks(model):
    ids = model.encode("Scoring the prompt: every token but the first gets a log-probability.")
    lp = log_softmax(model.logits(ids))
    expected = [None] + [lp[j, ids[j + 1]] for j in range(len(ids) - 1)]
    for chunk in (None, 3):
        engine = model.engine(prefill_chunk=chunk)
        seq = engine.add(ids, Options(n_tokens=0, prompt_logprobs=2))
        events = run(engine)
        r = seq.result
        assert events == [(None, None, "")] and r.ids == [] and r.stop_reason == "length"
        assert r.prompt_logprobs[0] is None
        np.testing.assert_allclose(r.prompt_logprobs[1:], expected[1:], atol=1e-5)
        for j, top in enumerate(r.prompt_top_logprobs[1:]):
            best = np.argsort(-lp[j], kind="stable")[:2]
            assert list(top) == best.tolist()
            np.testing.assert_allclose(list(top.values()), lp[j, best], atol=1e-5)


def test_top_logprobs_of_generated_tokens(model):
    g = model.complete("Top tokens", 6, stop_at_eos=False, logprobs=3)
    lp = log_softmax(model.logits(g.prompt_ids + g.ids))
    n = len(g.prompt_ids)
    for i, (token, top) in enumerate(zip(g.ids, g.top_logprobs)):
        row = lp[n - 1 + i]
        assert list(top) == np.argsort(-row, kind="stable")[:3].tolist()
        assert token == next(iter(top))  # greedy: the chosen token is the most likely
        np.testing.assert_allclose(g.logprobs[i], row[token], atol=1e-5)


def test_penalties_and_logit_bias(model):
    plain = model.complete("the the the", 12, stop_at_eos=False)
    banned = plain.ids[0]
    biased = model.complete("the the the", 12, stop_at_eos=False, logit_bias={banned: -100})
    assert banned not in biased.ids
    forced = model.complete("the the the", 5, stop_at_eos=False, logit_bias={"42": 100})
    assert forced.ids == [42] * 5
    # Penalties as OpenAI defines them: logit - count·frequency - (count > 0)·presence, counting
    # generated tokens only; checked step by step against the model's own logits.
    prompt = model.encode("the the the")
    g = model.complete(prompt, 15, stop_at_eos=False, frequency_penalty=0.7, presence_penalty=0.4)
    logits = model.logits(prompt + g.ids).astype(np.float64)
    for i, token in enumerate(g.ids):
        z = logits[len(prompt) - 1 + i].copy()
        for t in set(g.ids[:i]):
            z[t] -= 0.7 * g.ids[:i].count(t) + 0.4
        assert token == int(np.argmax(z))
    assert len(set(g.ids)) > len(set(plain.ids[:15]))  # the random model repeats itself without them
    # Log-probabilities stay the model's own, before penalties and bias.
    lp = log_softmax(model.logits(forced.prompt_ids + forced.ids[:1]))
    np.testing.assert_allclose(forced.logprobs[0], lp[len(forced.prompt_ids) - 1, 42], atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (dict(presence_penalty=3), "presence_penalty must be a number from -2 to 2"),
    (dict(frequency_penalty="1"), "frequency_penalty"),
    (dict(logit_bias={5: 101}), "logit bias of token 5"),
    (dict(logit_bias={"x": 1}), "logit_bias keys must be token ids"),
    (dict(logprobs=21), "logprobs must be a whole number from 0 to 20"),
    (dict(n_tokens=-1), "n_tokens"),
    (dict(stop=[""]), "stop strings"),
    (dict(top_p=0), "top-p"),
])
def test_options_are_checked_once_for_every_front_door(bad, message):
    with pytest.raises(GPT2Error, match=message):
        Options(**bad)


def test_logit_bias_outside_the_vocabulary(model):
    with pytest.raises(GPT2Error, match="outside the vocabulary"):
        model.complete("x", 2, logit_bias={50257: 1})


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    # Batches and prompt chunks change the last bits of the logits (other BLAS paths). On this
    # random model's flat distributions, drawing by the sorted cumulative sum diverged for a few
    # sequences in 60; the exponential race must not.
    rng = np.random.default_rng(1)
    kinds = [dict(temperature=0.9, top_p=0.9), dict(temperature=1.0), dict(temperature=0.7, top_k=40),
             dict(temperature=1.3, top_p=0.5, top_k=100)]
    reqs = [(model.encode(f"Client {i}: " + "word " * int(rng.integers(0, 10))),
             Options(n_tokens=40, stop_at_eos=False, seed=i, **kinds[i % 4])) for i in range(60)]

    def run(batch, max_batch=None, chunk=None):
        engine = model.engine(max_batch=max_batch, prefill_chunk=chunk)
        seqs = [engine.add(ids, o) for ids, o in batch]
        engine.run()
        return [s.result.ids for s in seqs]

    alone = [run([r])[0] for r in reqs]
    for max_batch, chunk in ((6, 8), (16, 3), (None, None)):
        assert run(reqs, max_batch, chunk) == alone
