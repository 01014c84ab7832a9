"""Sampling: the distributions themselves, not only that something came out."""

import numpy as np
import pytest

from gpt2np import GPT2Error, Sampling
from gpt2np.sampling import choose, log_normalizer, log_normalizers, logprob, token_logprob, top_ids, top_logprobs
from helpers.sampling_reference import allowed, candidates, log_softmax


def softmax64(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def nucleus(logits, temperature, p):
    """The smallest set of most likely tokens whose probability reaches p, by full sort."""
    probs = softmax64(logits.astype(np.float64) / temperature)
    order = np.lexsort((np.arange(len(probs)), -probs))
    mass = np.cumsum(probs[order])
    return set(order[:int(np.argmax(mass >= p)) + 1].tolist()), probs


@pytest.fixture
def logits():
    return np.random.default_rng(3).standard_normal(50257).astype(np.float32) * 3


def test_greedy_is_the_default_and_temperature_zero():
    assert Sampling().greedy and Sampling(temperature=0).greedy and Sampling(temperature=0, top_k=5).greedy
    assert not Sampling(top_k=5).greedy and not Sampling(top_p=0.9).greedy and not Sampling(temperature=0.7).greedy
    z = np.array([0.1, 3.0, 3.0, -1.0], np.float32)
    assert choose(z, Sampling(), None) == 1  # argmax, lowest id on a tie


@pytest.mark.parametrize("k", [1, 2, 40, 1000])
def test_top_k_never_leaves_the_k_best(logits, k):
    best = set(np.argsort(-logits.astype(np.float64), kind="stable")[:k].tolist())
    ids, p = candidates(logits, Sampling(top_k=k))
    assert set(ids.tolist()) == best and np.isclose(p.sum(), 1) and np.all(np.diff(p) <= 0)
    rng = Sampling(top_k=k, seed=0).rng()
    drawn = {choose(logits, Sampling(top_k=k), rng) for _ in range(3000)}
    assert drawn <= best
    if k <= 40:
        assert len(drawn) > 1 or k == 1


@pytest.mark.parametrize("p", [0.01, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_top_p_keeps_the_smallest_set_reaching_p_after_temperature(logits, p, temperature):
    expected, probs = nucleus(logits, temperature, p)
    ids, q = candidates(logits, Sampling(temperature=temperature, top_p=p))
    kept = set(ids.tolist())
    assert kept == expected
    mass = probs[list(kept)].sum()
    assert mass >= p - 1e-12
    assert mass - probs[ids[-1]] < p  # without its least likely member the set falls short
    np.testing.assert_allclose(q, probs[ids] / mass, rtol=1e-9)


def test_temperature_is_applied_before_filtering(logits):
    cold = set(candidates(logits, Sampling(temperature=0.5, top_p=0.9))[0].tolist())
    hot = set(candidates(logits, Sampling(temperature=2.0, top_p=0.9))[0].tolist())
    assert len(cold) < len(hot)  # a flatter distribution needs more tokens to reach p
    assert cold == nucleus(logits, 0.5, 0.9)[0]


def test_top_p_within_top_k_uses_the_renormalised_top_k(logits):
    k, p = 50, 0.5
    top = np.argsort(-logits.astype(np.float64), kind="stable")[:k]
    probs = softmax64(logits[top].astype(np.float64))
    n = int(np.argmax(np.cumsum(probs) >= p)) + 1
    ids, _ = candidates(logits, Sampling(top_k=k, top_p=p))
    assert ids.tolist() == top[:n].tolist()


def test_draws_follow_the_distribution():
    z = np.log(np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])).astype(np.float32)
    rng = Sampling(seed=1).rng()
    draws = np.array([choose(z, Sampling(temperature=1.0), rng) for _ in range(40000)])
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.125, 0.0625, 0.0625], atol=0.01)
    # temperature 2 flattens: p ∝ sqrt(p)
    rng = Sampling(seed=2).rng()
    draws = np.array([choose(z, Sampling(temperature=2.0), rng) for _ in range(40000)])
    flat = np.sqrt([0.5, 0.25, 0.125, 0.0625, 0.0625])
    np.testing.assert_allclose(np.bincount(draws, minlength=5) / len(draws), flat / flat.sum(), atol=0.01)


def test_same_seed_same_tokens(logits):
    s = Sampling(temperature=1.0, top_k=100, seed=1234)
    a = [choose(logits, s, r) for r in [s.rng()] for _ in range(50)]
    b = [choose(logits, s, r) for r in [s.rng()] for _ in range(50)]
    c = [choose(logits, Sampling(temperature=1.0, top_k=100, seed=99), r) for r in [Sampling(seed=99).rng()]
         for _ in range(50)]
    assert a == b and a != c


def test_the_random_stream_is_pcg64_everywhere():
    """The draw sequence of a seed is fixed by NumPy's PCG64 specification, not by the machine."""
    assert Sampling(seed=0).rng().random(3).tolist() == pytest.approx(
        [0.6369616873214543, 0.2697867137638703, 0.04097352393619469], abs=0)


def test_log_softmax_is_normalised(logits):
    lp = log_softmax(logits)
    assert lp.dtype == np.float64 and np.isclose(np.exp(lp).sum(), 1.0)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=0),
                                    dict(top_k=2.5), dict(top_p=0), dict(top_p=1.5), dict(seed=-1)])
def test_bad_values_are_errors(kwargs):
    with pytest.raises(GPT2Error):
        Sampling(**kwargs)


def test_token_logprob_equals_log_softmax(logits):
    lp = log_softmax(logits)
    for token in (0, int(np.argmax(logits)), 50256):
        # the subtraction of the maximum happens in float32: agreement to float32 precision
        assert token_logprob(logits, token) == pytest.approx(lp[token], rel=1e-6)


def test_one_token_one_float_wherever_it_is_reported():
    """A token's log-probability has one expression (`logprob`): the chosen token's value equals its
    entry among the top N to the last bit, and the argmax's equals the largest top-N value, on many
    rows of many scales (lm-evaluation-harness decides `is_greedy` by exact equality of the two)."""
    rng = np.random.default_rng(11)
    for trial in range(300):
        v = int(rng.choice([5, 97, 50257]))
        scale = float(rng.choice([1e-3, 0.3, 3.0, 40.0]))
        row = (rng.standard_normal(v) * scale + rng.normal(0, 50)).astype(np.float32)
        norm = log_normalizer(row)
        n = int(rng.integers(1, min(v, 20) + 1))
        top = top_logprobs(row, n, norm)
        assert list(top.values()) == sorted(top.values(), reverse=True)
        argmax = int(np.argmax(row))
        assert token_logprob(row, argmax, norm) == max(top.values()) == top[argmax]
        for token in [*top, int(rng.integers(v))]:
            value = token_logprob(row, token)  # its own normalizer: the same float
            assert value == token_logprob(row, token, norm) == float(logprob(row[token], norm))
            if token in top:
                assert value == top[token]
        # the batched form (scoring, prompt log-probabilities) gives the same floats
        rows = np.stack([row, row[::-1]])
        (t0, t1), (s0, s1) = log_normalizers(rows)
        assert float(logprob(rows[0][argmax], (t0, s0))) == top[argmax]


@pytest.mark.parametrize("shape", ["flat", "peaked", "two-level"])
@pytest.mark.parametrize("p", [0.3, 0.95])
def test_top_p_is_exact_on_flat_and_peaked_logits(shape, p):
    """A flat distribution (top-p keeps most of the vocabulary) and a peaked one (a few tokens)."""
    rng = np.random.default_rng(5)
    z = {"flat": rng.standard_normal(50257) * 0.01,
         "peaked": np.where(np.arange(50257) % 997 == 0, 12.0, rng.standard_normal(50257)),
         "two-level": np.where(rng.random(50257) < 0.1, 2.0, 0.0)}[shape].astype(np.float32)
    expected, probs = nucleus(z, 0.8, p)
    ids, q = candidates(z, Sampling(temperature=0.8, top_p=p))
    assert set(ids.tolist()) == expected
    np.testing.assert_allclose(q, probs[ids] / probs[ids].sum(), rtol=1e-9)


def test_ties_at_the_cut_keep_the_lowest_ids():
    z = np.zeros(1000, np.float32)
    z[[5, 900]] = 3.0  # two clear leaders, then 998 tokens tied
    ids, _ = candidates(z, Sampling(top_k=4))
    assert ids.tolist() == [5, 900, 0, 1]
    # top-p that needs exactly three of the tied tokens after the leaders
    e = np.exp(np.float64(3.0))
    need = (2 * e + 3) / (2 * e + 998)
    ids, _ = candidates(z, Sampling(top_p=need - 1e-9))
    assert ids.tolist() == [5, 900, 0, 1, 2]


def test_log_normalizers_of_a_batch_equal_each_row(logits):
    rows = np.stack([logits, logits * 0.1, -logits, np.full_like(logits, 7.0)])
    tops, log_sums = log_normalizers(rows)
    for row, top, log_sum in zip(rows, tops, log_sums):
        assert (top, log_sum) == log_normalizer(row)
        lp = log_softmax(row)
        assert float(row[3] - top - log_sum) == pytest.approx(lp[3], rel=1e-6, abs=1e-6)


def test_log_normalizers_of_many_rows_equal_each_row():
    rows = np.random.default_rng(2).standard_normal((37, 50257)).astype(np.float32) * 4  # several blocks
    tops, log_sums = log_normalizers(rows)
    assert all((t, s) == log_normalizer(r) for r, t, s in zip(rows, tops, log_sums))


@pytest.mark.parametrize("k", [1, 2, 5, 20, 100, 392, 393, 5000])
def test_top_ids_equal_a_full_sort_ties_included(k):
    rng = np.random.default_rng(k)
    rows = rng.standard_normal((24, 50257)).astype(np.float32)
    rows[1] = 0  # every logit tied
    rows[2, 100:200] = 5  # ties in one group's neighbourhood
    rows[3, ::785] = 9  # ties spread over every group, all in one interleaved group
    rows[4, 50200:] = 30  # the largest in the ids past the last whole group
    rows[5] = np.round(rows[5] * 2)  # many ties at every cut
    rows[6, [7, 7 + 785]] = 50  # two maxima in one group
    expected = [np.lexsort((np.arange(len(r)), -r))[:k] for r in rows.astype(np.float64)]
    np.testing.assert_array_equal(top_ids(rows, k), np.stack(expected))
    small = rng.standard_normal((3, 50)).astype(np.float32)
    np.testing.assert_array_equal(top_ids(small, k), np.stack([np.lexsort((np.arange(50), -r))[:k] for r in small]))


@pytest.mark.parametrize("temperature", [1e-46, 1e-40, 1e-6, 1e8, 1e39])
@pytest.mark.parametrize("filters", [dict(), dict(top_k=5), dict(top_p=0.01)])
def test_extreme_temperatures_stay_exact(logits, temperature, filters):
    s = Sampling(temperature=temperature, seed=0, **filters)
    ids = set(np.flatnonzero(allowed(logits, s)).tolist())
    order = np.argsort(-logits.astype(np.float64), kind="stable")
    if "top_k" in filters:
        assert ids == set(order[:5].tolist())
    if temperature < 1e-5:  # all the mass is on the most likely token
        assert [choose(logits, s, s.rng()) for _ in range(5)] == [int(order[0])] * 5
    elif "top_p" in filters:  # nearly uniform: about 1% of the vocabulary, the most likely ones
        assert abs(len(ids) - 503) <= 1
        if temperature == 1e8:  # still distinguishable in float64: exactly the most likely
            assert ids == set(order[:len(ids)].tolist())
    drawn = {choose(logits, s, r) for r in [s.rng()] for _ in range(20)}
    assert drawn <= ids
