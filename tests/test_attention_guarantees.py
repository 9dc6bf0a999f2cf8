"""Guarantees of the attention functions that once failed (each test failed before its fix).

Size-1 blocks, 64-bit mode, float64 precision, ``jax.debug_infs``, empty axes,
auto-dispatch transparency, input validation, mixed dtypes, and dropout statistics.
"""

import jax
import jax.numpy as jnp
import numpy as np
from module_helpers import np_sdpa
import pytest

from flax_attention import (
    additive_attention,
    attention_weights,
    causal_mask,
    chunked_attention,
    context_attention,
    key_mask,
    masked_softmax,
    padding_mask,
    query_key_mask,
    scaled_dot_product_attention as sdpa,
    segment_mask,
    sliding_window_mask,
)
from flax_attention.functional import attention


def _normal(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def _qkv(seed=0, batch=(2,), t=5, s=6, n=2, kh=1, h=4, d=3, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (_normal(rng, (*batch, t, n, h), dtype), _normal(rng, (*batch, s, kh, h), dtype),
            _normal(rng, (*batch, s, kh, d), dtype))


def _value_and_grads(fn, *args):
    """Output and gradients of sum(out · 2out) w.r.t. every argument, one jitted program."""
    def run(*args):
        out, pullback = jax.vjp(fn, *args)
        return out, pullback(2 * out)
    return jax.jit(run)(*args)


# ---------------------------------------------------------------- 1. size-1 blocks


@pytest.mark.parametrize("bq,bk", [(1, 6), (5, 1), (1, 1), (2, 1)])
def test_size_one_blocks_read_their_own_mask_and_bias_entries(bq, bk):
    # Mask and bias full along T and S: a size-1 block must read row i / column j,
    # not row 0 as if the axis were broadcast.
    q, k, v = _qkv(1)
    rng = np.random.default_rng(2)
    mask = rng.random((2, 2, 5, 6)) < 0.7
    mask[..., 0] = True
    bias = _normal(rng, (2, 5, 6))

    def dense(q, k, v, b):
        return sdpa(q, k, v, mask=mask, bias=b, implementation="dense")

    def chunked(q, k, v, b):
        return chunked_attention(q, k, v, mask=mask, bias=b, block_q=bq, block_k=bk)

    out_d, grads_d = _value_and_grads(dense, q, k, v, bias)
    out_c, grads_c = _value_and_grads(chunked, q, k, v, bias)
    np.testing.assert_allclose(out_c, np_sdpa(q, k, v, mask, bias)[0], atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(out_c, out_d, atol=2e-6, rtol=1e-5)
    for name, gd, gc in zip("qkvb", grads_d, grads_c):
        np.testing.assert_allclose(gc, gd, atol=2e-5, rtol=1e-4, err_msg=f"d{name}")


# ---------------------------------------------------------------- 2./3. 64-bit mode, float64


def test_x64_mode_chunked_and_auto_dispatch_work(monkeypatch):
    q, k, v = _qkv(3, t=9, s=7)
    with jax.enable_x64(True):
        want = sdpa(q, k, v, is_causal=True, implementation="dense")
        got = chunked_attention(q, k, v, is_causal=True, window=3, block_q=4, block_k=2)
        ref = sdpa(q, k, v, is_causal=True, window=3, implementation="dense")
        np.testing.assert_allclose(got, ref, atol=2e-6)
        monkeypatch.setattr(attention, "AUTO_CHUNKED_BYTES", 0)  # auto picks chunked
        auto = sdpa(q, k, v, is_causal=True)
        dq = jax.grad(lambda q: sdpa(q, k, v, is_causal=True).sum())(q)
        dq_dense = jax.grad(lambda q: sdpa(q, k, v, is_causal=True, implementation="dense").sum())(q)
    assert got.dtype == auto.dtype == jnp.float32
    np.testing.assert_allclose(auto, want, atol=2e-6)
    np.testing.assert_allclose(dq, dq_dense, atol=2e-5)


@pytest.mark.parametrize("impl", ["dense", "chunked", None])
def test_float64_inputs_are_computed_in_float64(impl, monkeypatch):
    q, k, v = _qkv(4, t=7, s=9, n=4, kh=2, dtype=np.float64)
    rng = np.random.default_rng(5)
    mask = rng.random((2, 1, 7, 9)) < 0.8
    mask[0, :, 3] = False  # a dead row
    bias = rng.standard_normal((4, 7, 9))
    want, want_w = np_sdpa(q, k, v, mask, bias, scale=0.7)
    monkeypatch.setattr(attention, "AUTO_CHUNKED_BYTES", 0)
    with jax.enable_x64(True):
        kw = dict(mask=mask, bias=bias, scale=0.7, implementation=impl)
        if impl == "chunked":
            out = chunked_attention(q, k, v, mask=mask, bias=bias, scale=0.7, block_q=4, block_k=4)
        else:
            out = sdpa(q, k, v, **kw)
        w = attention_weights(q, k, mask=mask, bias=bias, scale=0.7)
        sm = masked_softmax(jnp.asarray(bias), jnp.asarray(mask[0, 0]))
    assert out.dtype == w.dtype == sm.dtype == jnp.float64
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w, want_w, rtol=1e-12, atol=1e-12)


def test_float64_context_attention():
    rng = np.random.default_rng(6)
    h, w, b, u = (rng.standard_normal(s) for s in ((2, 5, 3), (3, 4), (4,), (4,)))
    mask = np.array([[True] * 5, [True, True, False, False, False]])
    scores = np.tanh(h @ w + b) @ u
    e = np.where(mask, np.exp(scores - scores.max(-1, keepdims=True)), 0)
    alpha = e / e.sum(-1, keepdims=True)
    with jax.enable_x64(True):
        ctx, weights = context_attention(h, w, b, u, mask=mask)
    assert ctx.dtype == weights.dtype == jnp.float64
    np.testing.assert_allclose(weights, alpha, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ctx, np.einsum("bs,bsd->bd", alpha, h), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- 4. no infinities


def test_no_inf_or_nan_produced_under_debug_infs_and_nans():
    q, k, v = _qkv(7, t=6, s=7)
    mask = np.ones((2, 1, 6, 7), bool)
    mask[0, :, 2] = False  # dead row by the mask
    bias = np.zeros((2, 6, 7), np.float32)
    bias[1, 4, :3] = -np.inf  # a user -inf bias is still allowed as input
    bias[0, 5, :] = -np.inf  # and can kill a row (bias is [N, T, S]: head 0, query 5)
    q, k, v, bias, mask = map(jnp.asarray, (q, k, v, bias, mask))

    def run(fn):
        def loss(q, k, v, b):
            return (fn(q, k, v, b) ** 2).sum()
        out = fn(q, k, v, bias)
        return out, jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)

    fns = {
        "dense": lambda q, k, v, b: sdpa(q, k, v, mask=mask, bias=b, is_causal=True, implementation="dense"),
        "chunked": lambda q, k, v, b: chunked_attention(q, k, v, mask=mask, bias=b, is_causal=True,
                                                        block_q=4, block_k=4),
    }
    results = {}
    row, row_mask = bias[1], mask[0, 0]  # indexing a -inf array outputs -inf: done outside
    # Eager, jit disabled: every primitive's output is checked, including inside loops.
    with jax.debug_infs(True), jax.debug_nans(True), jax.disable_jit():
        for name, fn in fns.items():
            results[name] = run(fn)
        sm = masked_softmax(row, row_mask)
        jax.grad(lambda x: (masked_softmax(x, row_mask) * jnp.arange(7.0)).sum())(row)
    (out_d, g_d), (out_c, g_c) = results["dense"], results["chunked"]
    assert np.all(np.asarray(out_d[0, 2]) == 0) and np.all(np.asarray(out_d[:, 5, 0]) == 0)
    np.testing.assert_allclose(out_c, out_d, atol=2e-6)
    for gd, gc in zip(g_d, g_c):
        assert np.all(np.isfinite(gd)) and np.all(np.isfinite(gc))
        np.testing.assert_allclose(gc, gd, atol=2e-5)
    assert np.all(np.asarray(sm[2]) == 0)


# ---------------------------------------------------------------- 5. empty axes


@pytest.mark.parametrize("impl", ["dense", "chunked", None])
def test_zero_keys_give_zeros_and_zero_queries_an_empty_output(impl):
    q, k, v = _qkv(8, t=3, s=0)
    call = (lambda *a: chunked_attention(*a)) if impl == "chunked" else \
        (lambda *a: sdpa(*a, implementation=impl))
    out = call(q, k, v)
    assert out.shape == (2, 3, 2, 3) and np.all(np.asarray(out) == 0)
    grads = jax.grad(lambda q, k, v: call(q, k, v).sum(), argnums=(0, 1, 2))(q, k, v)
    assert grads[0].shape == q.shape and np.all(np.asarray(grads[0]) == 0)
    q0, k0, v0 = _qkv(8, t=0, s=4)
    out0 = call(q0, k0, v0)
    assert out0.shape == (2, 0, 2, 3)
    dk = jax.grad(lambda k: call(q0, k, v0).sum())(k0)
    assert dk.shape == k0.shape and np.all(np.asarray(dk) == 0)


def test_zero_keys_in_weights_softmax_and_additive():
    q, k, v = _qkv(9, t=3, s=0)
    out, w = sdpa(q, k, v, return_weights=True, is_causal=True)
    assert out.shape == (2, 3, 2, 3) and w.shape == (2, 2, 3, 0) and np.all(np.asarray(out) == 0)
    assert masked_softmax(jnp.zeros((3, 0))).shape == (3, 0)
    ctx, weights = additive_attention(np.ones((2, 3, 4), np.float32), np.ones((2, 0, 5), np.float32), None,
                                      np.ones((4, 6), np.float32), np.ones((5, 6), np.float32),
                                      np.ones(6, np.float32))
    assert ctx.shape == (2, 3, 5) and weights.shape == (2, 3, 0) and np.all(np.asarray(ctx) == 0)
    ctx, weights = context_attention(np.ones((2, 0, 3), np.float32), np.ones((3, 4), np.float32),
                                     np.ones(4, np.float32), np.ones(4, np.float32))
    assert ctx.shape == (2, 3) and np.all(np.asarray(ctx) == 0)


# ---------------------------------------------------------------- 6. auto is transparent


def test_auto_dispatch_supports_traced_scale_and_forward_mode(monkeypatch):
    monkeypatch.setattr(attention, "AUTO_CHUNKED_BYTES", 0)  # every input is "large"
    q, k, v = (jnp.asarray(x) for x in _qkv(10, t=4, s=5))
    # The probe is live: without forward mode, auto really takes the chunked path.
    assert "custom_vjp" in str(jax.make_jaxpr(lambda q: sdpa(q, k, v))(q))

    def dense(q, k, v, scale=None):
        return sdpa(q, k, v, scale=scale, implementation="dense")

    def auto(q, k, v, scale=None):
        return sdpa(q, k, v, scale=scale)

    # Traced scale under jit, and its gradient (a learned temperature).
    for fn in (auto, lambda q, k, v, scale: chunked_attention(q, k, v, scale=scale, block_q=2, block_k=2)):
        got = jax.jit(fn)(q, k, v, 0.3)
        np.testing.assert_allclose(got, dense(q, k, v, 0.3), atol=2e-6)
        g = jax.jit(jax.grad(lambda s: (fn(q, k, v, s) ** 2).sum()))(0.3)
        g_dense = jax.grad(lambda s: (dense(q, k, v, s) ** 2).sum())(0.3)
        np.testing.assert_allclose(g, g_dense, rtol=1e-5)
    # Forward mode: jvp (plain, of a jitted function) and hessian.
    tangents = tuple(jnp.ones_like(x) for x in (q, k, v))
    want = jax.jvp(dense, (q, k, v), tangents)
    for got in (jax.jvp(auto, (q, k, v), tangents), jax.jvp(jax.jit(auto), (q, k, v), tangents)):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=2e-6)
    hess_dense = jax.hessian(lambda q: (sdpa(q, k[:1], v[:1], implementation="dense") ** 2).sum())(q[:1, :2])
    hess_auto = jax.hessian(lambda q: (sdpa(q, k[:1], v[:1]) ** 2).sum())(q[:1, :2])
    assert hess_auto.shape == (1, 2, 2, 4) * 2
    np.testing.assert_allclose(hess_auto, hess_dense, atol=1e-5)
    # Explicit "chunked" cannot do forward mode: it says so instead of a raw TypeError.
    with pytest.raises(ValueError, match="forward-mode"):
        jax.jvp(lambda q: chunked_attention(q, k, v), (q,), (q,))


# ---------------------------------------------------------------- 7./8. validation, dtypes


_F = np.ones((1, 3, 2, 4), np.float32)
BAD = {
    "softmax_float_mask": (lambda: masked_softmax(jnp.zeros((2, 3)), jnp.ones((2, 3))), "boolean.*float32"),
    "softmax_int_mask": (lambda: masked_softmax(jnp.zeros((2, 3)), jnp.ones((2, 3), jnp.int32)), "boolean.*int32"),
    "int_qkv": (lambda: sdpa(*(x.astype(np.int32) for x in (_F, _F, _F))), "floating.*int32.*astype"),
    "int_qkv_chunked": (lambda: chunked_attention(_F.astype(np.int32), _F.astype(np.int32)), "floating.*int32"),
    "int_weights": (lambda: attention_weights(_F.astype(np.int32), _F.astype(np.int32)), "floating.*int32"),
    "none_query": (lambda: sdpa(None, _F, _F), "query must be an array.*None"),
    "none_key": (lambda: chunked_attention(_F, None), "key must be an array.*None"),
    "mixed": (lambda: sdpa(_F, _F.astype(np.float16), _F.astype(np.float16)),
              "same dtype.*float32.*float16.*astype"),
    "mixed_value": (lambda: chunked_attention(_F, _F, _F.astype(np.float16)), "same dtype.*float16"),
    "mixed_weights": (lambda: attention_weights(_F, _F.astype(jnp.bfloat16)), "same dtype.*bfloat16"),
    "window_bool": (lambda: sliding_window_mask(3, window=True), "window.*True"),
    "window_bool_chunked": (lambda: chunked_attention(_F, _F, window=(True, 1)), "window"),
    "window_bool_sdpa": (lambda: sdpa(_F, _F, window=True, implementation="dense"), "window"),
    "block_float": (lambda: chunked_attention(_F, _F, block_q=2.5), "block_q.*2.5"),
    "block_bool": (lambda: chunked_attention(_F, _F, block_k=True), "block_k.*True"),
    "max_length_negative": (lambda: padding_mask(jnp.array([1]), -1), "max_length.*-1"),
    "max_length_float": (lambda: padding_mask(jnp.array([1]), 2.5), "max_length.*2.5"),
    "lengths_negative": (lambda: padding_mask(jnp.array([2, -1]), 3), "lengths.*negative"),
    "causal_negative": (lambda: causal_mask(-2), "q_len.*-2"),
    "causal_kv_negative": (lambda: causal_mask(2, -1), "kv_len.*-1"),
    "window_len_negative": (lambda: sliding_window_mask(3, -1, window=1), "kv_len.*-1"),
    "scalar_key_mask": (lambda: key_mask(jnp.array(True)), r"\[\.\.\., S\].*\(\)"),
    "qk_mask_batch": (lambda: query_key_mask(jnp.ones((2, 3), bool), jnp.ones((3, 4), bool)),
                      r"batch.*\(2, 3\).*\(3, 4\)"),
    "qk_mask_scalar": (lambda: query_key_mask(jnp.array(True), jnp.ones((3,), bool)), r"\[\.\.\., T\]"),
    "segment_batch": (lambda: segment_mask(jnp.ones((2, 3), int), jnp.ones((3, 4), int)),
                      r"batch.*\(2, 3\).*\(3, 4\)"),
    "segment_float": (lambda: segment_mask(jnp.ones((2, 3))), "integer.*float32"),
    "additive_int": (lambda: additive_attention(np.ones((1, 2, 3), np.int32), np.ones((1, 2, 3), np.int32), None,
                                                np.ones((3, 2)), np.ones((3, 2)), np.ones(2)), "floating.*int32"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_inputs_raise_one_clear_value_error(name):
    fn, pattern = BAD[name]
    with pytest.raises(ValueError, match=pattern):
        fn()


def test_lists_are_accepted_like_arrays():
    # Decision: array-likes go through jnp.asarray (as in jax.nn.dot_product_attention).
    q, k, v = _qkv(11, batch=(1,), t=2, s=3)
    want = sdpa(q, k, v)
    np.testing.assert_allclose(sdpa(q.tolist(), k.tolist(), v.tolist()), want, rtol=1e-6)
    np.testing.assert_allclose(chunked_attention(q.tolist(), k.tolist(), v.tolist()), want, atol=1e-6)
    np.testing.assert_allclose(attention_weights(q.tolist(), k.tolist()), attention_weights(q, k), rtol=1e-6)


def test_query_key_and_segment_masks_broadcast_batch_dims():
    qk = query_key_mask(jnp.array([[True, False]]), jnp.array([[True, True, False]] * 3))
    assert qk.shape == (3, 1, 2, 3)
    seg = segment_mask(jnp.array([[1, 2]]), jnp.array([[1, 1, 2], [2, 0, 2]]))
    np.testing.assert_array_equal(seg[1, 0], [[False, False, False], [True, False, True]])


# ---------------------------------------------------------------- 9. dropout statistics


def test_dropout_keeps_one_minus_p_and_rescales_by_its_inverse():
    # One-hot values make the output row the dropped weight row. Over 50 draws of
    # 2·2·4·8 = 128 weights each (6400 Bernoulli trials, p = 0.4) the kept fraction
    # has standard deviation sqrt(0.24 / 6400) ≈ 0.006: 0.6 ± 0.03 is a 5-sigma band.
    rate, s = 0.4, 8
    q, k, _ = _qkv(12, t=4, s=s)
    v = np.broadcast_to(np.eye(s, dtype=np.float32)[None, :, None, :], (2, s, 1, s))
    clean = np.asarray(sdpa(q, k, v))
    outs = np.asarray(jax.vmap(lambda r: sdpa(q, k, v, dropout_rate=rate, dropout_rng=r, deterministic=False))(
        jax.random.split(jax.random.key(3), 50)))
    kept = outs != 0
    assert abs(kept.mean() - (1 - rate)) < 0.03
    np.testing.assert_allclose(outs[kept], np.broadcast_to(clean / (1 - rate), outs.shape)[kept], rtol=1e-5)
    # Rows keep their expected mass: E[Σ_s dropped w_s] = Σ_s w_s = 1 (within 5 sigma).
    assert abs(outs.sum(-1).mean() - 1.0) < 0.05
    # Masks differ between draws, heads and queries (not one shared pattern).
    assert len({kept[i].tobytes() for i in range(50)}) == 50
    assert not np.all(kept[:, :, :, 0] == kept[:, :, :, 1])
