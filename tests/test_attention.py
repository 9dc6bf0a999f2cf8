"""Tests for flax_attention.functional.attention against float64 NumPy, jax.nn and flax.linen."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from module_helpers import np_sdpa
import pytest

from flax_attention import (
    attention_weights,
    masked_softmax,
    padding_mask,
    scaled_dot_product_attention,
    segment_mask,
    sliding_window_mask,
)

RTOL, ATOL = 2e-5, 2e-6  # float32 computations vs a float64 reference

# Jitted once per shape: one XLA compile per test instead of dozens of eager op dispatches
# keeps the suite fast. Eager behaviour is covered by test_jit_equals_eager and the error tests.
sdpa = jax.jit(
    scaled_dot_product_attention,
    static_argnames=("scale", "is_causal", "causal_alignment", "dropout_rate", "deterministic",
                     "return_weights", "precision"),
)


def _rand(shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _qkv(batch, t, s, n, k, h, d, seed=0):
    return (_rand((*batch, t, n, h), seed), _rand((*batch, s, k, h), seed + 1),
            _rand((*batch, s, k, d), seed + 2))


# (batch, T, S, N, K, H, D, mask kind, with bias, causal alignment or None, scale)
CASES = [
    ((2,), 5, 5, 2, 2, 4, 4, None, False, None, None),
    ((2, 3), 3, 6, 4, 2, 8, 5, "padding", True, None, None),  # GQA, T != S, D != H, 2 batch dims
    ((), 4, 4, 4, 1, 4, 3, None, False, "bottom_right", None),  # MQA, no batch dims
    ((2,), 6, 3, 2, 2, 4, 4, "random", True, "bottom_right", 0.3),  # T > S: empty rows
    ((1, 2), 3, 5, 6, 3, 2, 7, "padding", False, "top_left", None),
    ((3,), 4, 7, 2, 1, 5, 5, "random", True, "top_left", 2.0),
    # T = 1 over several kv heads: a decode step, on CPU the one-query form (see the next test).
    ((3,), 1, 6, 4, 2, 8, 5, "random", True, None, None),
    ((2, 2), 1, 5, 3, 3, 4, 4, "padding", False, "bottom_right", 0.5),
]


def _case_inputs(case):
    batch, t, s, n, k, h, d, mask_kind, with_bias, align, scale = case
    q, kk, v = _qkv(batch, t, s, n, k, h, d)
    rng = np.random.default_rng(7)
    mask = None
    if mask_kind == "padding":
        lengths = rng.integers(1, s + 1, size=batch)
        mask = np.asarray(padding_mask(jnp.asarray(lengths), s))[..., None, None, :]  # [..., 1, 1, S]
    elif mask_kind == "random":
        mask = rng.random((*batch, n, t, s)) < 0.7
    bias = rng.normal(size=(*batch, n, t, s)).astype(np.float32) if with_bias else None
    return q, kk, v, mask, bias, align, scale


@pytest.mark.parametrize("case", CASES)
def test_matches_float64_reference(case):
    q, k, v, mask, bias, align, scale = _case_inputs(case)
    ref_mask = mask
    if align is not None:  # independent of the library: query i is position i + offset
        t, s = q.shape[-3], k.shape[-3]
        offset = s - t if align == "bottom_right" else 0
        causal = np.arange(s)[None, :] <= np.arange(t)[:, None] + offset
        ref_mask = causal if mask is None else mask & causal
    want_out, want_w = np_sdpa(q, k, v, ref_mask, bias, scale)
    out, w = sdpa(q, k, v, mask=mask, bias=bias, scale=scale, is_causal=align is not None,
                  causal_alignment=align or "bottom_right", return_weights=True)
    assert out.shape == want_out.shape and out.dtype == jnp.float32
    assert w.shape == want_w.shape and w.dtype == jnp.float32
    np.testing.assert_allclose(out, want_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(w, want_w, rtol=RTOL, atol=ATOL)
    weights_fn = jax.jit(attention_weights, static_argnames=("scale", "is_causal", "causal_alignment"))
    w2 = weights_fn(q, k, mask=mask, bias=bias, scale=scale, is_causal=align is not None,
                    causal_alignment=align or "bottom_right")
    np.testing.assert_allclose(w2, w, rtol=1e-6, atol=1e-7)


def test_value_none_means_key_is_value():
    q, k, _ = _qkv((2,), 3, 4, 4, 2, 5, 5)
    np.testing.assert_array_equal(sdpa(q, k), sdpa(q, k, k))
    np.testing.assert_allclose(sdpa(q, k), np_sdpa(q, k, k)[0], rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- other libraries


@pytest.mark.parametrize("n,k,variant", [(4, 4, "plain"), (4, 2, "mask_bias"), (4, 1, "causal"), (2, 2, "window")])
def test_matches_jax_nn(n, k, variant):
    q, kk, v = _qkv((2,), 5, 7, n, k, 8, 8, seed=3)
    kw, ours = {}, {}
    if variant == "mask_bias":
        mask = np.random.default_rng(1).random((2, n, 5, 7)) < 0.8
        mask[..., 0] = True  # jax.nn does not zero fully masked rows; keep every row alive
        bias = _rand((2, n, 5, 7), 2)
        kw = ours = dict(mask=mask, bias=bias)
    elif variant == "causal":  # jax.nn aligns the causal mask top-left when T != S
        kw, ours = dict(is_causal=True), dict(is_causal=True, causal_alignment="top_left")
    elif variant == "window":
        kw = dict(local_window_size=(1, 2))
        ours = dict(mask=sliding_window_mask(5, 7, window=(1, 2), alignment="top_left"))
    want = jax.nn.dot_product_attention(q, kk, v, implementation="xla", **kw)
    np.testing.assert_allclose(sdpa(q, kk, v, **ours), want, rtol=1e-5, atol=1e-5)


def test_matches_flax_linen():
    q, k, v = _qkv((2, 3), 4, 6, 2, 2, 8, 8, seed=5)  # flax: [..., T, N, H], equal heads
    rng = np.random.default_rng(0)
    mask = rng.random((2, 3, 2, 4, 6)) < 0.7
    mask[..., -1] = True  # flax gives fully masked rows uniform weights; avoid them
    bias = _rand((2, 3, 2, 4, 6), 9)
    want = nn.dot_product_attention(q, k, v, bias=bias, mask=mask, deterministic=True)
    np.testing.assert_allclose(sdpa(q, k, v, mask=mask, bias=bias), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- hand-computable


def test_identical_keys_give_uniform_weights_and_mean_of_values():
    q = _rand((1, 3, 2, 4), 0)
    k = np.broadcast_to(_rand((1, 1, 2, 4), 1), (1, 5, 2, 4))
    v = np.arange(5 * 2 * 3, dtype=np.float32).reshape(1, 5, 2, 3)
    out, w = sdpa(q, k, v, return_weights=True)
    np.testing.assert_allclose(w, np.full((1, 2, 3, 5), 0.2), rtol=1e-6)
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(1, keepdims=True), (1, 3, 2, 3)), rtol=1e-6)


def test_huge_one_hot_logit_picks_that_value():
    # Key s is a one-hot on axis s; a query 100 * e_j gives logit 100 for key j and 0 otherwise,
    # so exp(-100) ~ 4e-44 is the weight left on every other key.
    s = 4
    k = np.eye(s, dtype=np.float32)[None, :, None, :]  # [1, S, 1, H=S]
    v = _rand((1, s, 1, 3), 2)
    q = 100.0 * np.eye(s, dtype=np.float32)[None, [2, 0, 3], None, :]  # queries pick keys 2, 0, 3
    out = sdpa(q, k, v, scale=1.0)
    np.testing.assert_allclose(out[0, :, 0], v[0, [2, 0, 3], 0], rtol=1e-6)


def test_single_key_is_copied():
    q, k, v = _qkv((2,), 3, 1, 2, 2, 4, 3)
    out = sdpa(q, k, v)
    np.testing.assert_allclose(out, np.broadcast_to(v, out.shape), rtol=1e-6)


# ---------------------------------------------------------------- masked rows, dtypes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_fully_masked_row_is_zero_with_finite_grads(dtype):
    q, k, v = (jnp.asarray(x, dtype) for x in _qkv((2,), 3, 4, 2, 2, 4, 4))
    mask = np.ones((2, 2, 3, 4), bool)
    bias = np.zeros((2, 2, 3, 4), np.float32)
    mask[0, :, 1] = False  # batch 0, query 1: dead by the mask
    bias[1, :, 0] = -np.inf  # batch 1, query 0: dead by an all -inf bias row
    bias[1, :, 2, :2] = -np.inf  # batch 1, query 2: partly -inf, stays a proper softmax
    mask[1, :, 1, 2:] = False  # batch 1, query 1: mask and -inf bias together kill the row
    bias[1, :, 1, :2] = -np.inf
    mask, bias = jnp.asarray(mask), jnp.asarray(bias)
    dead = [(0, 1), (1, 0), (1, 1)]

    def loss(q, k, v, bias):
        return sdpa(q, k, v, mask=mask, bias=bias).astype(jnp.float32).sum()

    out, w = sdpa(q, k, v, mask=mask, bias=bias, return_weights=True)
    assert out.dtype == dtype and w.dtype == jnp.float32
    out, w = np.asarray(out, np.float32), np.asarray(w)
    assert np.all(np.isfinite(out))
    sums = w.sum(-1)  # [B, N, T]
    for b, t in dead:
        assert np.all(out[b, t] == 0.0) and np.all(w[b, :, t] == 0.0)
    np.testing.assert_allclose(sums[0, :, [0, 2]], 1.0, rtol=1e-5)
    np.testing.assert_allclose(sums[1, :, 2], 1.0, rtol=1e-5)
    assert np.all(w[1, :, 2, :2] == 0.0)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
    for b, t in dead:  # a dead query gets no gradient
        assert np.all(np.asarray(grads[0][b, t], np.float32) == 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n,k", [(4, 2), (3, 3)])
def test_one_query_form_equals_the_general_form(n, k, dtype):
    # A one-query call (B > 1, K > 1) on CPU folds (S, K) instead of transposing the keys; the
    # same query duplicated (T = 2) takes the general form: both rows must give the same
    # output, weights and gradients, a dead row included.
    from flax_attention.functional import attention as impl

    q, kk, v = (jnp.asarray(x, dtype) for x in _qkv((3,), 1, 6, n, k, 4, 5, seed=4))
    mask = np.random.default_rng(1).random((3, n, 1, 6)) < 0.6
    mask[2, 1] = False  # example 2, head 1: nothing to attend to
    assert impl._one_query(q.shape, k) == (jax.default_backend() == "cpu")
    assert not impl._one_query((3, 2, n, 4), k)

    def run(q, kk, v, rows):
        out, w = sdpa(jnp.repeat(q, rows, 1), kk, v, mask=jnp.repeat(jnp.asarray(mask), rows, 2),
                      return_weights=True)
        return out[:, :1], w[..., :1, :]

    def loss(q, kk, v, rows):
        return run(q, kk, v, rows)[0].astype(jnp.float32).sum()

    tol = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
    one, two = run(q, kk, v, 1), run(q, kk, v, 2)
    for a, b in zip(one, two):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
    assert one[0].dtype == dtype and np.all(np.asarray(one[0][2, 0, 1], np.float32) == 0.0)
    g1 = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, kk, v, 1)
    g2 = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, kk, v, 2)
    for a, b in zip(g1, g2):
        assert np.all(np.isfinite(np.asarray(a, np.float32)))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


def test_masked_softmax_all_masked_and_partial():
    logits = jnp.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [-jnp.inf, -jnp.inf, -jnp.inf]], jnp.bfloat16)
    mask = jnp.array([[True, True, True], [False, True, False], [True, True, True]])
    got = masked_softmax(logits, mask)
    assert got.dtype == jnp.float32
    e = np.exp(np.array([1.0, 2.0, 3.0]) - 3.0)
    np.testing.assert_allclose(got[0], e / e.sum(), rtol=1e-6)
    np.testing.assert_array_equal(got[1], [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(got[2], [0.0, 0.0, 0.0])
    g = jax.grad(lambda x: (masked_softmax(x, mask) * jnp.arange(3.0)).sum())(logits.astype(jnp.float32))
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g[1:]) == 0.0)


def test_masked_softmax_other_axis():
    x = _rand((3, 4), 0)
    np.testing.assert_allclose(masked_softmax(x, axis=0), jax.nn.softmax(x, axis=0), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_uses_float32_logits(dtype):
    # Logits of 300 * 300 = 9e4 overflow float16 (max 65504); the float32 path must not.
    q = np.array([[[[300.0]], [[-300.0]]]], np.float32)  # [1, T=2, N=1, H=1]
    k = np.array([[[[300.0]], [[299.0]]]], np.float32)  # [1, S=2, K=1, H=1]
    v = np.array([[[[1.0]], [[2.0]]]], np.float32)
    out, w = sdpa(jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), return_weights=True)
    want_out, want_w = np_sdpa(np.asarray(jnp.asarray(q, dtype), np.float32),
                               np.asarray(jnp.asarray(k, dtype), np.float32), v)
    assert out.dtype == dtype and w.dtype == jnp.float32
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out, np.float32), want_out, rtol=1e-2)


def test_low_precision_close_to_float32():
    q, k, v = _qkv((2,), 4, 6, 4, 2, 8, 8)
    want = np_sdpa(q, k, v)[0]
    got = sdpa(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2)


# ---------------------------------------------------------------- causality via gradients


def _dependency(t, s, **kw):
    """[T, S] matrices: |d out_t / d key_s| and |d out_t / d value_s| summed over the other axes."""
    q, k, v = (jnp.asarray(x) for x in _qkv((), t, s, 2, 1, 4, 3, seed=11))
    # One compiled program: [T, N, D, S, K, H] and [T, N, D, S, K, D] Jacobians.
    jk, jv = jax.jit(jax.jacrev(lambda k, v: sdpa(q, k, v, **kw), argnums=(0, 1)))(k, v)
    return np.abs(np.asarray(jk)).sum((1, 2, 4, 5)), np.abs(np.asarray(jv)).sum((1, 2, 4, 5))


@pytest.mark.parametrize("t,s", [(3, 6), (6, 3)])
@pytest.mark.parametrize("alignment", ["bottom_right", "top_left"])
def test_causality_by_gradient(t, s, alignment):
    dk, dv = _dependency(t, s, is_causal=True, causal_alignment=alignment)
    offset = s - t if alignment == "bottom_right" else 0
    allowed = np.arange(s)[None, :] <= np.arange(t)[:, None] + offset
    assert np.all(dk[~allowed] == 0.0) and np.all(dv[~allowed] == 0.0)
    # The value gradient is the attention weight, positive wherever attending is allowed.
    assert np.all(dv[allowed] > 0.0)
    # Keys matter only where the row has >= 2 allowed keys (one key gets weight 1 regardless).
    multi = allowed & (allowed.sum(1, keepdims=True) > 1)
    assert np.all(dk[multi] > 0.0)


@pytest.mark.parametrize("window", [1, (1, 1), (0, 2)])
def test_sliding_window_by_gradient(window):
    t = s = 6
    left, right = (window, 0) if isinstance(window, int) else window
    _, dv = _dependency(t, s, mask=sliding_window_mask(t, s, window=window))
    diff = np.arange(t)[:, None] - np.arange(s)[None, :]
    allowed = (diff <= left) & (-diff <= right)
    assert np.all(dv[~allowed] == 0.0) and np.all(dv[allowed] > 0.0)


# ---------------------------------------------------------------- packed sequences


def test_packed_segments_equal_separate_sequences():
    lens = (3, 4)
    total = 8  # 3 + 4 + one padding token
    ids = np.array([1] * lens[0] + [2] * lens[1] + [0])
    q, k, v = _qkv((1,), total, total, 2, 1, 4, 5, seed=21)
    mask = segment_mask(ids[None])  # [1, 1, T, S]
    packed = sdpa(q, k, v, mask=mask, is_causal=True)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        alone = sdpa(q[:, sl], k[:, sl], v[:, sl], is_causal=True)
        np.testing.assert_allclose(packed[:, sl], alone, rtol=1e-6, atol=1e-6)
        start += n
    assert np.all(np.asarray(packed[:, -1]) == 0.0)  # the padding token attends to nothing


# ---------------------------------------------------------------- dropout


def test_deterministic_ignores_dropout_rate():
    q, k, v = _qkv((2,), 3, 4, 2, 2, 4, 4)
    np.testing.assert_array_equal(sdpa(q, k, v, dropout_rate=0.5, deterministic=True), sdpa(q, k, v))


def test_dropout_without_rng_raises():
    q, k, v = _qkv((2,), 3, 4, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="dropout_rng"):
        sdpa(q, k, v, dropout_rate=0.1, deterministic=False)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_dropout_rate_out_of_range_raises(rate):
    q, k, v = _qkv((2,), 3, 4, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="dropout_rate"):
        sdpa(q, k, v, dropout_rate=rate, deterministic=False, dropout_rng=jax.random.key(0))


def test_dropout_zeroes_or_rescales_weights_and_is_unbiased():
    # With one-hot values (value s = e_s) the output row *is* the dropped weight row,
    # so inverted dropout must give exactly 0 or w / (1 - rate) per entry, with mean w.
    rate, s = 0.25, 5
    q, k, _ = _qkv((1,), 3, s, 2, 2, 4, 4)
    v = np.broadcast_to(np.eye(s, dtype=np.float32)[None, :, None, :], (1, s, 2, s))
    clean, w_clean = sdpa(q, k, v, return_weights=True)
    np.testing.assert_allclose(np.moveaxis(np.asarray(w_clean), 1, 2), clean, rtol=1e-6)

    def dropped(rng):
        return sdpa(q, k, v, dropout_rate=rate, dropout_rng=rng, deterministic=False, return_weights=True)

    outs, ws = jax.vmap(dropped)(jax.random.split(jax.random.key(1), 2000))
    np.testing.assert_allclose(ws, np.broadcast_to(w_clean, ws.shape), rtol=1e-6)  # weights are pre-dropout
    outs = np.asarray(outs)
    kept = np.isclose(outs, np.asarray(clean) / (1 - rate), rtol=1e-5)
    assert np.all(kept | (outs == 0.0)) and 0.7 < kept.mean() < 0.8
    # Mean over 2000 draws: standard error is w * sqrt(rate / (1 - rate) / 2000) < 0.013 w.
    np.testing.assert_allclose(outs.mean(0), clean, rtol=0.07)


# ---------------------------------------------------------------- transformations


def test_jit_equals_eager():
    q, k, v, mask, bias, _, _ = _case_inputs(CASES[1])

    def f(q, k, v, mask, bias):
        return scaled_dot_product_attention(q, k, v, mask=mask, bias=bias, is_causal=True, return_weights=True)

    for a, b in zip(f(q, k, v, mask, bias), jax.jit(f)(q, k, v, mask, bias)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_vmap_matches_batched_call():
    q, k, v = _qkv((3, 2), 4, 5, 4, 2, 4, 6)
    mask = np.random.default_rng(3).random((3, 2, 1, 4, 5)) < 0.7
    vmapped = jax.vmap(lambda q, k, v, m: sdpa(q, k, v, mask=m))(q, k, v, mask)
    np.testing.assert_allclose(vmapped, sdpa(q, k, v, mask=mask), rtol=1e-6, atol=1e-7)


def test_weights_sum_to_one_on_live_rows_and_shapes():
    q, k, v = _qkv((2, 3), 4, 6, 6, 2, 4, 5)
    lengths = jnp.array([[0, 2, 6], [1, 5, 3]])  # a length-0 sequence: all rows dead
    mask = padding_mask(lengths, 6)[..., None, None, :]
    out, w = sdpa(q, k, v, mask=mask, return_weights=True)
    assert out.shape == (2, 3, 4, 6, 5) and w.shape == (2, 3, 6, 4, 6)
    sums = np.asarray(w).sum(-1)
    want = np.broadcast_to((np.asarray(lengths) > 0)[..., None, None], sums.shape).astype(np.float32)
    np.testing.assert_allclose(sums, want, rtol=1e-6)


def test_new_length_values_do_not_retrace():
    traces = []
    q, k, v = _qkv((2,), 3, 5, 2, 1, 4, 4)

    @jax.jit
    def f(lengths):
        traces.append(None)  # Python side effect: runs once per trace only.
        return sdpa(q, k, v, mask=padding_mask(lengths, 5)[:, None, None, :], is_causal=True)

    for lengths in ([5, 1], [2, 3], [0, 4]):
        f(jnp.array(lengths)).block_until_ready()
    assert len(traces) == 1


# ---------------------------------------------------------------- input validation


# query (2, 3, 4, 8) = [B, T, N, H], key/value (2, 4, 2, 8) = [B, S, K, H]: logits (2, 4, 3, 4).
# Each pattern names the problem and the offending (received) shape; "expected" is the legend
# or the other operand's shape.
_Q, _K, _V = _qkv((2,), 3, 4, 4, 2, 8, 8)
BAD_INPUTS = {
    "rank2": (dict(query=_Q[0, :, 0], key=_K[0, :, 0], value=_V[0, :, 0]), r"rank >= 3.*\(3, 8\)"),
    "key_rank": (dict(key=_K[0], value=_V[0]), r"same rank.*\(2, 3, 4, 8\).*\(4, 2, 8\)"),
    "batch": (dict(key=_K[:1], value=_V[:1]), r"batch.*\(2, 3, 4, 8\).*\(1, 4, 2, 8\)"),
    "value_len": (dict(value=_V[:, :3]), r"agree on S and K.*\(2, 4, 2, 8\).*\(2, 3, 2, 8\)"),
    "head_dim": (dict(key=_K[..., :4]), r"head dims.*\(2, 3, 4, 8\).*\(2, 4, 2, 4\)"),
    "heads": (dict(query=_Q[..., :3, :]), r"N=3 must be a multiple of kv heads K=2.*\(2, 3, 3, 8\)"),
    "float_mask": (dict(mask=jnp.ones((4, 3, 4))), "boolean.*float32"),
    "mask_shape": (dict(mask=jnp.ones((3, 3), bool)), r"\(3, 3\).*\(2, 4, 3, 4\)"),
    "bias_shape": (dict(bias=jnp.ones((2, 4, 3, 5))), r"\(2, 4, 3, 5\).*\(2, 4, 3, 4\)"),
    "bias_rank": (dict(bias=jnp.ones((1, 2, 4, 3, 4))), r"\(1, 2, 4, 3, 4\).*\(2, 4, 3, 4\)"),
    "bool_bias": (dict(bias=jnp.ones((3, 4), bool)), "bias.*boolean.*mask="),
    "alignment": (dict(is_causal=True, causal_alignment="left"), "alignment.*'left'"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_shapes(name):
    kwargs, pattern = BAD_INPUTS[name]
    args = {"query": _Q, "key": _K, "value": _V, **kwargs}
    q, k, v = args.pop("query"), args.pop("key"), args.pop("value")
    with pytest.raises(ValueError, match=pattern):
        scaled_dot_product_attention(q, k, v, **args)
    if v is _V and k.ndim == q.ndim:  # attention_weights validates the same way
        with pytest.raises(ValueError, match=pattern):
            attention_weights(q, k, **args)


def test_unmasked_softmax_equals_the_guarded_form_with_its_derivatives():
    # The unguarded (fusable) form serves calls with nothing masked; values and
    # first/second derivatives must equal the guarded form's (float64 reference).
    from flax_attention.functional import attention as A

    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)) * 4, jnp.float64)
        t = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5)), jnp.float64)
        fast, ref = (lambda y: A._softmax(y, None)), (lambda y: A._guarded_softmax(y, None))
        np.testing.assert_allclose(fast(x), ref(x), rtol=1e-14)
        np.testing.assert_allclose(jax.jvp(fast, (x,), (t,))[1], jax.jvp(ref, (x,), (t,))[1], rtol=1e-12)
        w = jnp.arange(15.0).reshape(3, 5)
        hess = [jax.hessian(lambda y: (f(y) * w).sum())(x[0]) for f in (fast, ref)]
        np.testing.assert_allclose(hess[0], hess[1], rtol=1e-10, atol=1e-14)
    assert A._softmax(jnp.zeros((2, 0)), None).shape == (2, 0)  # an empty key axis stays valid
