"""Sampling filters (temperature, top-k, top-p): hand-computed cases, frequencies, exact greedy, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention.functional.sampling import (
    EXCLUDED,
    check_sampling,
    filter_logits,
    sample_logits,
    top_k_filter,
    top_p_filter,
)

# A fixed table: probabilities 0.4, 0.25, 0.15, 0.1, 0.06, 0.04 (in shuffled order).
PROBS = np.array([0.1, 0.4, 0.04, 0.25, 0.06, 0.15])
LOGITS = np.log(PROBS).astype(np.float32)


# Jitted once per static setting: one compile instead of one per eager op.
top_k_filter = jax.jit(top_k_filter, static_argnums=1)
top_p_filter = jax.jit(top_p_filter, static_argnums=1)
filter_logits = jax.jit(filter_logits, static_argnames=("temperature", "top_k", "top_p"))
sample = jax.jit(sample_logits, static_argnames=("temperature", "top_k", "top_p"))


def kept(filtered):
    return np.flatnonzero(np.asarray(filtered) > EXCLUDED / 2).tolist()


def test_top_k_keeps_the_k_largest_and_ties():
    x = jnp.array([1.0, 3.0, 2.0, 0.0])
    np.testing.assert_array_equal(top_k_filter(x, 2), np.float32([EXCLUDED, 3.0, 2.0, EXCLUDED]))
    assert kept(top_k_filter(x, 4)) == [0, 1, 2, 3] == kept(top_k_filter(x, 9))
    assert kept(top_k_filter(jnp.array([2.0, 1.0, 2.0, 0.5]), 1)) == [0, 2]  # a tie at the cut is kept


def test_top_p_keeps_the_smallest_nucleus():
    # Sorted mass ahead of each token: 0, 0.4, 0.65, 0.8, 0.9, 0.96.
    assert kept(top_p_filter(LOGITS, 0.3)) == [1]                  # the top token always survives
    assert kept(top_p_filter(LOGITS, 0.5)) == [1, 3]               # 0.4 < 0.5, so one more
    assert kept(top_p_filter(LOGITS, 0.7)) == [1, 3, 5]
    assert kept(top_p_filter(LOGITS, 0.85)) == [0, 1, 3, 5]
    assert kept(top_p_filter(LOGITS, 1.0)) == list(range(6))
    # Kept logits are unchanged; batched rows are filtered independently.
    rows = top_p_filter(jnp.stack([LOGITS, LOGITS[::-1]]), 0.5)
    np.testing.assert_array_equal(rows[0, [1, 3]], LOGITS[[1, 3]])
    assert kept(rows[1]) == [2, 4]


def _reference_kept(row, k=None, p=None):
    """The definitions by sorting, in float64 NumPy: top-k = the k largest and ties; top-p = the sorted
    prefix whose mass ahead is below p, and ties with its last token."""
    order = np.argsort(-row, kind="stable")
    if k is not None:
        return set(np.flatnonzero(row >= row[order[min(k, row.size) - 1]]))
    probs = np.exp(row - row.max())
    probs = probs / probs.sum()
    ahead = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
    last = order[np.sum(ahead < p) - 1]
    return set(np.flatnonzero(row >= row[last]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_filters_equal_their_sorting_definitions_on_random_rows(dtype):
    # The filters bisect over the logits' bit patterns instead of sorting: same sets, ties included
    # (quarter-integer logits make ties common), negative and positive logits, -0.0 == 0.0.
    r = np.random.default_rng(3)
    rows = np.concatenate([r.integers(-12, 12, (20, 40)) / 4.0, r.standard_normal((20, 40)) * 5])
    rows[0, :3] = [0.0, -0.0, 0.0]
    with jax.enable_x64(dtype == np.float64):
        x = jnp.asarray(rows, dtype)
        for k in (1, 3, 17, 39):
            got = np.asarray(top_k_filter(x, k)) > EXCLUDED / 2
            assert [set(np.flatnonzero(g)) for g in got] == [_reference_kept(row, k=k) for row in rows], k
        for p in (0.05, 0.5, 0.9, 0.999):
            got = np.asarray(top_p_filter(x, p)) > EXCLUDED / 2
            assert [set(np.flatnonzero(g)) for g in got] == [_reference_kept(row, p=p) for row in rows], p
        kept = np.asarray(top_k_filter(x, 3))
        np.testing.assert_array_equal(kept[kept > EXCLUDED / 2], rows[kept > EXCLUDED / 2].astype(dtype))


def test_filter_order_temperature_then_top_k_then_top_p():
    # Temperature 2 flattens the distribution: sqrt(p) renormalised.
    flat = np.sqrt(PROBS) / np.sqrt(PROBS).sum()
    out = filter_logits(LOGITS, temperature=2.0)
    np.testing.assert_allclose(jax.nn.softmax(out), flat, rtol=1e-6)
    # top_p acts on the temperature-scaled distribution: flat's sorted mass ahead is 0, .276, .494, ...
    assert kept(filter_logits(LOGITS, temperature=2.0, top_p=0.45)) == [1, 3]
    assert kept(filter_logits(LOGITS, temperature=1.0, top_p=0.45)) == [1, 3]
    assert kept(filter_logits(LOGITS, temperature=2.0, top_p=0.5)) == [1, 3, 5]
    # top_k first, then top_p on what is left (renormalised): {0.4, 0.25, 0.15} -> 0.5, 0.3125, ...
    assert kept(filter_logits(LOGITS, top_k=3, top_p=0.55)) == [1, 3]
    assert kept(filter_logits(LOGITS, top_k=3, top_p=0.45)) == [1]


def test_greedy_is_exact_argmax():
    logits = jax.random.normal(jax.random.key(0), (64, 50))
    want = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(sample(None, logits, temperature=0.0), want)
    for seed in range(3):  # top_k=1 leaves one token: every key draws it
        got = sample(jax.random.key(seed), logits, temperature=1.0, top_k=1)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == jnp.int32


def _chi_square_ok(counts, expected_probs, n):
    """Pearson chi-square below the 0.999 quantile (Wilson-Hilferty approximation) for the kept tokens."""
    support = expected_probs > 0
    assert np.all(counts[~support] == 0), "a filtered-out token was drawn"
    exp = n * expected_probs[support]
    stat = np.sum((counts[support] - exp) ** 2 / exp)
    df = support.sum() - 1
    z = 3.09  # 0.999 quantile of the standard normal
    limit = df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3
    return stat, limit


@pytest.mark.parametrize("kwargs,support", [
    (dict(temperature=1.0, top_k=3), [1, 3, 5]),
    (dict(temperature=1.0, top_p=0.7), [1, 3, 5]),
    (dict(temperature=0.5, top_k=4, top_p=0.9), [1, 3, 5]),
    (dict(temperature=2.0, top_k=5), [0, 1, 3, 4, 5]),
])
def test_sampling_frequencies_match_the_truncated_distribution(kwargs, support):
    # The expected distribution, by hand: p^(1/T) on the support, renormalised.
    expected = np.zeros(6)
    expected[support] = PROBS[support] ** (1.0 / kwargs["temperature"])
    expected /= expected.sum()
    n = 20000
    draws = sample(jax.random.key(42), jnp.broadcast_to(LOGITS, (n, 6)), **kwargs)
    counts = np.bincount(np.asarray(draws), minlength=6)
    stat, limit = _chi_square_ok(counts, expected, n)
    assert stat < limit, (counts / n, expected)


def test_reproducible_for_a_fixed_key():
    logits = jax.random.normal(jax.random.key(1), (8, 30))
    a = sample(jax.random.key(7), logits, temperature=1.3, top_p=0.9)
    b = sample(jax.random.key(7), logits, temperature=1.3, top_p=0.9)
    c = sample(jax.random.key(8), logits, temperature=1.3, top_p=0.9)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_precision_and_debug_infs():
    bf16 = jnp.asarray(LOGITS, jnp.bfloat16)
    assert filter_logits(bf16, top_k=2).dtype == jnp.float32
    with jax.debug_infs(True), jax.debug_nans(True):
        jax.block_until_ready(sample(jax.random.key(0), LOGITS, temperature=0.7, top_k=3, top_p=0.8))
    with jax.enable_x64(True):
        assert filter_logits(jnp.asarray(LOGITS, jnp.float64), top_p=0.5).dtype == jnp.float64


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.5), r"temperature=-0.5 must be a number >= 0"),
    (dict(temperature=float("nan")), r"temperature=nan"),
    (dict(top_k=0), r"top_k=0 must be an int >= 1"),
    (dict(top_k=2.5), r"top_k=2.5 must be an int"),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    (dict(max_new_tokens=-1), r"max_new_tokens=-1 must be an int >= 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_sampling(**kwargs)
    if "max_new_tokens" not in kwargs:
        with pytest.raises(ValueError, match=match):
            sample_logits(jax.random.key(0), LOGITS, **kwargs)
    with pytest.raises(ValueError, match="temperature=1.0 needs a PRNG key"):
        sample_logits(None, LOGITS, temperature=1.0)
    with pytest.raises(ValueError, match="temperature=0 is greedy"):
        filter_logits(LOGITS, temperature=0.0)
