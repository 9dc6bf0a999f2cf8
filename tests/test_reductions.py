"""core.reductions: argmax as two reductions, token-accuracy hits; checked against jnp.argmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention.core.reductions import argmax, top_token_hits


def test_argmax_by_hand():
    x = jnp.array([[1.0, 3.0, 3.0, 2.0],      # tie: the first maximum
                   [-jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf],  # all -inf: index 0, as jnp.argmax
                   [0.0, jnp.nan, 5.0, jnp.nan],  # NaN counts as the maximum: the first NaN
                   [4.0, 1.0, 0.0, -1.0]])
    np.testing.assert_array_equal(argmax(x), [1, 0, 1, 0])
    np.testing.assert_array_equal(argmax(x), jnp.argmax(x, -1))
    assert argmax(x).dtype == jnp.int32


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_argmax_equals_jnp_argmax_with_many_ties(dtype, axis):
    # Small integers make ties common on every axis.
    x = jnp.asarray(np.random.default_rng(0).integers(-3, 3, (5, 7, 9)), dtype)
    np.testing.assert_array_equal(argmax(x, axis), jnp.argmax(x, axis))
    np.testing.assert_array_equal(jax.jit(argmax, static_argnums=1)(x, axis), jnp.argmax(x, axis))


def test_argmax_float64_and_vmap():
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 6, 11)), jnp.float64)
        np.testing.assert_array_equal(argmax(x), jnp.argmax(x, -1))
        np.testing.assert_array_equal(jax.vmap(argmax)(x), jnp.argmax(x, -1))


def test_argmax_refuses_an_empty_axis():
    with pytest.raises(ValueError, match="empty axis"):
        argmax(jnp.zeros((3, 0)))


def test_top_token_hits_is_argmax_equality_without_ties():
    r = np.random.default_rng(2)
    logits = jnp.asarray(r.standard_normal((3, 5, 50)), jnp.float32)
    targets = jnp.asarray(r.integers(0, 50, (3, 5)), jnp.int32)
    targets = targets.at[0].set(jnp.argmax(logits[0], -1))  # some hits for sure
    hits = top_token_hits(logits, targets)
    np.testing.assert_array_equal(hits, jnp.argmax(logits, -1) == targets)
    assert hits[0].all() and hits.dtype == jnp.bool_


def test_top_token_hits_at_ties_and_constant_rows():
    logits = jnp.array([[1.0, 2.0, 2.0], [0.5, 0.5, 0.5], [3.0, 1.0, 2.0]])
    # A target tied for the maximum is a hit (argmax would say row 0 -> 1 only);
    # a constant row is never a hit (a collapsed model does not score 1.0).
    np.testing.assert_array_equal(top_token_hits(logits, jnp.array([2, 0, 2])), [True, False, False])
    np.testing.assert_array_equal(top_token_hits(logits, jnp.array([1, 1, 0])), [True, False, True])
