"""Tests for flax_attention.linen.additive: float64 NumPy references, padding, modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention import (
    AdditiveAttention,
    BahdanauAttention,
    additive_attention,
    additive_scores,
    context_attention,
    padding_mask,
)


def _rand(shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def np_softmax(e, mask):
    """Float64 masked softmax; a row with no True entry is all zeros."""
    e = np.where(mask, e, -np.inf)
    m = e.max(-1, keepdims=True)
    x = np.where(mask, np.exp(e - np.where(np.isfinite(m), m, 0.0)), 0.0)
    d = x.sum(-1, keepdims=True)
    return x / np.where(d > 0, d, 1.0)


def np_bahdanau(q, k, v, wq, wk, a, mask):
    """e_ts = aᵀ tanh(W_q q_t + W_k k_s) (Bahdanau et al. 2015), float64."""
    q, k, v, wq, wk, a = (np.asarray(x, np.float64) for x in (q, k, v, wq, wk, a))
    hidden = np.tanh((q @ wq)[..., :, None, :] + (k @ wk)[..., None, :, :])  # [..., T, S, A]
    scores = hidden @ a
    w = np_softmax(scores, np.broadcast_to(mask, scores.shape))
    return scores, w @ v, w


def np_context(h, w, b, u, mask):
    """α_s = softmax_s(uᵀ tanh(W h_s + b)), c = Σ α_s h_s (Yang et al. 2016), float64."""
    h, w, b, u = (np.asarray(x, np.float64) for x in (h, w, b, u))
    scores = np.tanh(h @ w + b) @ u
    alpha = np_softmax(scores, np.broadcast_to(mask, scores.shape))
    return np.einsum("...s,...sd->...d", alpha, h), alpha


def _bahdanau_inputs(batch=(2, 3), t=4, s=5, eq=6, ek=7, d=3, a=8):
    q, k, v = _rand((*batch, t, eq), 0), _rand((*batch, s, ek), 1), _rand((*batch, s, d), 2)
    params = (_rand((eq, a), 3) / 2, _rand((ek, a), 4) / 2, _rand((a,), 5))
    lengths = np.random.default_rng(6).integers(0, s + 1, size=batch)
    lengths.flat[0] = 0  # one all-padding sequence
    mask = np.asarray(padding_mask(jnp.asarray(lengths), s))[..., None, :]  # [..., 1, S]
    return q, k, v, params, mask


additive_jit = jax.jit(additive_attention)
context_jit = jax.jit(context_attention)


# ---------------------------------------------------------------- query-key form


def test_additive_scores_match_reference():
    q, k, v, (wq, wk, a), mask = _bahdanau_inputs()
    want, _, _ = np_bahdanau(q, k, v, wq, wk, a, True)
    got = jax.jit(additive_scores)(q, k, wq, wk, a)
    assert got.shape == (2, 3, 4, 5) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_value", [True, False])
def test_additive_attention_matches_reference_and_zeroes_padding(use_value):
    q, k, v, (wq, wk, a), mask = _bahdanau_inputs()
    v = v if use_value else None
    _, want_ctx, want_w = np_bahdanau(q, k, k if v is None else v, wq, wk, a, mask)
    ctx, w = additive_jit(q, k, v, wq, wk, a, mask=mask)
    assert ctx.shape == want_ctx.shape and w.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(ctx, want_ctx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
    full_mask = np.broadcast_to(mask, w.shape)
    assert np.all(np.asarray(w)[~full_mask] == 0.0)  # padding: exactly zero weight
    np.testing.assert_array_equal(ctx[0, 0], 0.0)  # all-padding sequence: zero context


def test_additive_all_padding_has_finite_grads():
    q, k, v, (wq, wk, a), _ = _bahdanau_inputs(batch=(2,))
    mask = np.array([[False] * 5, [True, True, False, False, False]])[:, None, :]

    def loss(*args):
        ctx, _ = additive_attention(*args, mask=mask)
        return (ctx**2).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))(q, k, v, wq, wk, a)
    for g in grads:
        assert np.all(np.isfinite(g))
    assert np.all(np.asarray(grads[0][0]) == 0.0) and np.any(np.asarray(grads[0][1]) != 0.0)


def test_additive_hand_computed():
    # With v = 0 every score is 0: uniform weights over real keys, context = their mean.
    q, k, v, (wq, wk, _), _ = _bahdanau_inputs(batch=(1,), s=4)
    mask = np.array([True, True, True, False])
    ctx, w = additive_attention(q, k, v, wq, wk, np.zeros(8, np.float32), mask=mask)
    np.testing.assert_allclose(w, np.broadcast_to([1 / 3, 1 / 3, 1 / 3, 0.0], w.shape), rtol=1e-6)
    np.testing.assert_allclose(ctx[0], np.broadcast_to(v[0, :3].mean(0), ctx[0].shape), rtol=1e-5)


# ---------------------------------------------------------------- context-vector form


def _context_inputs(batch=(2, 3), s=6, d=5, a=4):
    h = _rand((*batch, s, d), 10)
    params = (_rand((d, a), 11), _rand((a,), 12), _rand((a,), 13))
    lengths = np.random.default_rng(14).integers(1, s + 1, size=batch)
    lengths.flat[-1] = 0
    return h, params, np.asarray(padding_mask(jnp.asarray(lengths), s))


def test_context_attention_matches_reference_and_zeroes_padding():
    h, (w, b, u), mask = _context_inputs()
    want_ctx, want_alpha = np_context(h, w, b, u, mask)
    ctx, alpha = context_jit(h, w, b, u, mask=mask)
    assert ctx.shape == (2, 3, 5) and alpha.shape == (2, 3, 6)
    np.testing.assert_allclose(ctx, want_ctx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alpha, want_alpha, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(alpha)[~mask] == 0.0)
    np.testing.assert_array_equal(ctx[-1, -1], 0.0)  # all-padding: zero context
    np.testing.assert_allclose(np.asarray(alpha)[mask.any(-1)].sum(-1), 1.0, rtol=1e-6)


def test_context_attention_no_mask_and_low_precision():
    h, (w, b, u), _ = _context_inputs(batch=(2,))
    want_ctx, _ = np_context(h, w, b, u, True)
    ctx, alpha = context_jit(jnp.asarray(h, jnp.bfloat16), w, b, u)
    assert ctx.dtype == jnp.bfloat16 and alpha.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ctx, np.float32), want_ctx, atol=5e-2)


def test_context_attention_all_padding_has_finite_grads():
    h, (w, b, u), _ = _context_inputs(batch=(2,))
    mask = np.zeros((2, 6), bool)
    mask[1, :3] = True

    def loss(h, w, b, u):
        return (context_attention(h, w, b, u, mask=mask)[0] ** 2).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(h, w, b, u)
    for g in grads:
        assert np.all(np.isfinite(g))
    assert np.all(np.asarray(grads[0][0]) == 0.0)


# ---------------------------------------------------------------- validation


def test_bad_inputs_raise_value_error_naming_shapes():
    q, k, v, (wq, wk, a), mask = _bahdanau_inputs(batch=(2,))
    with pytest.raises(ValueError, match=r"\(2, 4, 6\).*\(3, 5, 7\)"):
        additive_attention(q, k[:1].repeat(3, 0), None, wq, wk, a)
    with pytest.raises(ValueError, match=r"\(2, 5, 7\).*\(2, 3, 3\)"):
        additive_attention(q, k, v[:, :3], wq, wk, a)
    with pytest.raises(ValueError, match="boolean"):
        additive_attention(q, k, v, wq, wk, a, mask=mask.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(2, 1, 4\).*\[\.\.\., T, S\]"):
        additive_attention(q, k, v, wq, wk, a, mask=mask[..., :4])
    with pytest.raises(ValueError, match=r"w_query"):
        additive_attention(q, k, v, wq[:5], wk, a)
    h, (w, b, u), cmask = _context_inputs(batch=(2,))
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 6, 5\)"):
        context_attention(h, w, b, u, mask=cmask[:, :5])
    with pytest.raises(ValueError, match=r"\(3, 6\)"):
        context_attention(h, w, b, u, mask=np.ones((3, 6), bool))
    with pytest.raises(ValueError, match=r"w of shape"):
        context_attention(h, w[:4], b, u)


# ---------------------------------------------------------------- modules


def test_additive_attention_module_shapes_and_matches_function():
    h = _rand((2, 3, 7, 5), 20)
    mask = np.arange(7) < np.array([[7, 3, 0], [1, 2, 5]])[..., None]
    module = AdditiveAttention(attention_size=4)
    params = module.init(jax.random.key(0), h, mask)
    shapes = jax.tree_util.tree_map(jnp.shape, params["params"])
    assert shapes == {"w": (5, 4), "b": (4,), "u": (4,)}
    ctx, alpha = jax.jit(module.apply)(params, h, mask)
    assert ctx.shape == (2, 3, 5) and alpha.shape == (2, 3, 7)
    p = params["params"]
    want_ctx, want_alpha = np_context(h, p["w"], p["b"], p["u"], mask)
    np.testing.assert_allclose(ctx, want_ctx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alpha, want_alpha, rtol=1e-5, atol=1e-6)


def test_bahdanau_module_shapes_and_matches_function():
    q, k, v = _rand((2, 4, 6), 30), _rand((2, 5, 7), 31), _rand((2, 5, 3), 32)
    mask = (np.arange(5) < np.array([5, 2])[:, None])[:, None, :]
    module = BahdanauAttention(attention_size=8)
    params = module.init(jax.random.key(0), q, k, v, mask)
    shapes = jax.tree_util.tree_map(jnp.shape, params["params"])
    assert shapes == {"w_query": (6, 8), "w_key": (7, 8), "v": (8,)}
    ctx, w = jax.jit(module.apply)(params, q, k, v, mask)
    assert ctx.shape == (2, 4, 3) and w.shape == (2, 4, 5)
    p = params["params"]
    _, want_ctx, want_w = np_bahdanau(q, k, v, p["w_query"], p["w_key"], p["v"], mask)
    np.testing.assert_allclose(ctx, want_ctx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
