"""Samplers: each one's defining property, per-row settings, greedy and seeded reproducibility."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from valle_jax import sampling as S

V = 50


@pytest.fixture
def logits():
    return jax.random.normal(jax.random.key(0), (4, V)) * 3.0


def test_top_k_keeps_exactly_k_per_row(logits):
    k = jnp.array([1, 5, 0, V + 3])
    out = S.top_k(logits, k)
    kept = np.isfinite(np.asarray(out)).sum(-1)
    assert list(kept) == [1, 5, V, V]
    top5 = np.argsort(-np.asarray(logits[1]))[:5]
    assert set(np.flatnonzero(np.isfinite(out[1]))) == set(top5)


def test_kth_largest_is_the_sorted_rows_kth_value_with_ties_signs_and_infinities():
    x = np.random.default_rng(0).normal(size=(6, 300)).astype(np.float32) * 50
    x[0, :40] = 7.25  # ties across the k-th place
    x[1, ::3] = -np.inf
    x[2] = -x[2]
    x[3, :5] = [np.inf, 0.0, -0.0, 0.0, -0.0]
    x[4] = -0.0
    x[5, :150] = np.float32(1e-38)  # subnormal and tiny values
    k = np.array([35, 250, 1, 3, 17, 400])
    want = -np.sort(-x, axis=1)[np.arange(6), np.clip(k, 1, 300) - 1]
    assert np.array_equal(np.asarray(S.kth_largest(jnp.asarray(x), jnp.asarray(k)))[:, 0], want)


def test_top_p_keeps_the_smallest_set_reaching_p(logits):
    p = jnp.array([0.5, 0.9, 1.0, 0.0])
    out = np.asarray(S.top_p(logits, p))
    probs = np.asarray(jax.nn.softmax(logits, -1))
    for row, pr in enumerate([0.5, 0.9]):
        kept = np.isfinite(out[row])
        order = np.argsort(-probs[row])
        n = kept.sum()
        assert set(np.flatnonzero(kept)) == set(order[:n])  # the most likely tokens
        assert probs[row][order[:n]].sum() >= pr > probs[row][order[: n - 1]].sum()  # smallest such set
    assert np.isfinite(out[2]).all()  # p = 1: off
    assert np.isfinite(out[3]).sum() == 1  # the top token is always kept


def test_min_p(logits):
    out = np.asarray(S.min_p(logits, jnp.array([0.1, 0.0, 1.0, 0.5])))
    probs = np.asarray(jax.nn.softmax(logits, -1))
    assert (np.isfinite(out[0]) == (probs[0] >= 0.1 * probs[0].max())).all()
    assert np.isfinite(out[1]).all() and np.isfinite(out[2]).sum() == 1


def test_sign_aware_penalties_never_raise_a_token():
    logits = jnp.array([[2.0, -2.0, 0.5, -0.5, 1.0]])
    history = jnp.array([[0, 1, 3, 1]])  # most recent last: 1 (distance 1), 3 (2), 0 (4)
    valid = jnp.ones_like(history, bool)
    out = S.repetition_penalty(logits, history, valid, jnp.array([2.0]), jnp.array([1.0]))
    np.testing.assert_allclose(out[0], [2.0 / (2 * 4), -2.0 * 2, 0.5, -0.5 * 4, 1.0])
    assert (np.asarray(out) <= np.asarray(logits)).all()
    ref = S.repetition_penalty(logits, history, valid, jnp.array([2.0]), jnp.array([1.0]), sign_aware=False)
    assert float(ref[0, 1]) > float(logits[0, 1])  # the reference's sign-blind quirk raises a negative logit
    # invalid history positions are ignored, and factor 1 is a no-op
    masked = S.repetition_penalty(logits, history, valid.at[0, 3].set(False), jnp.array([2.0]), jnp.array([0.0]))
    np.testing.assert_allclose(masked[0], [1.0, -4.0, 0.5, -1.0, 1.0])
    np.testing.assert_array_equal(
        S.repetition_penalty(logits, history, valid, jnp.array([1.0]), jnp.array([1.0])), logits
    )
    lp = S.length_penalty(jnp.array([[0.0, 3.0, -3.0], [0.0, 3.0, -3.0]]), jnp.array([3, 3]), jnp.array([1.0, 0.0]), 2)
    np.testing.assert_allclose(lp, [[0.0, 3.0, -12.0], [0.0, 3.0, -3.0]])


def test_dynamic_temperature_moves_towards_min_when_confident():
    confident = jnp.array([[10.0] + [0.0] * (V - 1)])
    unsure = jnp.zeros((1, V))
    t, t_min = jnp.array([1.0]), jnp.array([0.2])
    assert float(S.temperature_of(confident, t, t_min)[0]) == pytest.approx(0.2, abs=0.01)
    assert float(S.temperature_of(unsure, t, t_min)[0]) == pytest.approx(1.0, abs=0.01)
    assert float(S.temperature_of(confident, t, t)[0]) == 1.0


def test_greedy_rows_seeded_draws_and_per_row_settings(logits):
    t = jnp.array([0.0, 1.0, 0.0, 1.5])
    a = S.sample(jax.random.key(3), logits, temperature_B=t)
    b = S.sample(jax.random.key(3), logits, temperature_B=t)
    np.testing.assert_array_equal(a, b)  # seeded: reproducible
    am = np.argmax(np.asarray(logits), -1)
    assert a[0] == am[0] and a[2] == am[2]
    draws = jax.vmap(lambda k: S.sample(k, logits, temperature_B=t, top_k_B=jnp.array([0, 2, 0, 0])))(
        jax.random.split(jax.random.key(1), 200)
    )
    assert set(np.asarray(draws[:, 1])) <= set(np.argsort(-np.asarray(logits[1]))[:2])
    assert len(set(np.asarray(draws[:, 3]))) > 3  # a warm row really samples
    # one compile serves other settings
    f = jax.jit(lambda k, x, t, kk: S.sample(k, x, temperature_B=t, top_k_B=kk))
    f(jax.random.key(0), logits, t, jnp.array([1, 2, 3, 4]))
    f(jax.random.key(0), logits, t * 0.5, jnp.array([4, 3, 2, 1]))
    assert f._cache_size() == 1


def test_mirostat_tracks_its_target_surprise():
    zipf = -1.2 * jnp.log(jnp.arange(1, 1025, dtype=jnp.float32))  # a Zipfian distribution over 1024 codes
    logits = jnp.stack([zipf, zipf])
    tau, eta = jnp.array([3.0, 5.0]), jnp.array([0.1, 0.1])
    probs = np.asarray(jax.nn.softmax(logits, -1))
    mu = S.mirostat_init(tau)
    np.testing.assert_allclose(mu, [6.0, 10.0])
    surprises = []
    for key in jax.random.split(jax.random.key(0), 400):
        tok, mu = S.mirostat(key, logits, mu, tau, eta)
        surprises.append(-np.log2(probs[np.arange(2), np.asarray(tok)]))
    mean = np.mean(surprises[100:], axis=0)
    np.testing.assert_allclose(mean, [3.0, 5.0], atol=0.6)  # each row tracks its own tau


def test_repetition_aware_sampling_escapes_loops():
    logits = jnp.array([[5.0, 4.0, 3.0] + [0.0] * (V - 3)] * 2)
    history = jnp.array([[0] * 10, list(range(3, 13))])  # row 0 repeats token 0, row 1 does not
    valid = jnp.ones_like(history, bool)
    keys = jax.random.split(jax.random.key(2), 300)
    draws = np.asarray(
        jax.vmap(
            lambda k: S.repetition_aware(
                k, logits, history, valid, top_p_B=jnp.array([0.5, 0.5]), temperature_B=jnp.array([1.0, 1.0])
            )
        )(keys)
    )
    assert set(draws[:, 1]) == {0}  # the nucleus is token 0 alone, and it has not been repeated
    assert len(set(draws[:, 0])) > 2  # row 0 looped on token 0: drawn from the whole distribution


def test_categorical_draws_the_softmax_distribution_and_never_a_filtered_token():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 1.0]]))  # -inf where p = 0
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: S.categorical(k, logits))(keys))
    freq = np.bincount(draws[:, 0], minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2, 0.0], atol=0.03)
    assert (draws[:, 1] == 3).all()


def test_the_stop_token_is_banned_below_the_minimum_length_before_truncation():
    """Below its minimum a row cannot draw the stop token, even when top-p kept nothing else: the
    ban comes before truncation, so the nucleus is chosen among what may be drawn."""
    stop = V - 1
    x = jnp.full((3, V), -5.0).at[:, stop].set(10.0).at[:, 3].set(0.0)  # the stop token takes ~all the mass
    length, minimum = jnp.array([0, 4, 5]), jnp.array([0, 5, 5])
    out = np.asarray(
        S.filter_logits(x, top_p_B=jnp.full((3,), 0.5), length_B=length, min_length_B=minimum, stop_token=stop)
    )
    assert np.isfinite(out[0, stop]) and np.isfinite(out[2, stop])  # no minimum / reached it
    assert out[1, stop] == -np.inf and np.flatnonzero(np.isfinite(out[1])).tolist() == [3]
    tok = S.sample(
        jax.random.key(0), x, temperature_B=jnp.ones(3), length_B=length, min_length_B=minimum, stop_token=stop
    )
    assert int(tok[1]) != stop and int(tok[0]) == stop
