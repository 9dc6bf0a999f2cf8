"""flax_attention.nnx.MultiHeadAttention: flax's NNX attention tests ported, parity with
flax.nnx.MultiHeadAttention, KV cache, dead rows, training and lifted transforms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax_attention.nnx as fnnx

B, T, S, E, N = 2, 5, 7, 8, 4


def _x(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _pair(seed=0, **kw):
    """Ours and flax's module from the same seed: the same init order gives the same parameters."""
    kw = dict(num_heads=N, in_features=E, **kw)
    return fnnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(seed)), nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(seed))


def _params(m):
    return nnx.to_pure_dict(nnx.state(m, nnx.Param))


# --- ported from google/flax tests/nnx/nn/attention_test.py -----------------------------------

def test_basic():
    module = fnnx.MultiHeadAttention(num_heads=2, in_features=3, qkv_features=6, out_features=6,
                                     rngs=nnx.Rngs(0))
    y = module(jnp.ones((1, 7, 3)), decode=False)
    assert y.shape == (1, 7, 6)


def test_multihead_sow_attention_weights():
    class Model(nnx.Module):
        def __init__(self, attention_kwargs, rng):
            self.attention_layers = nnx.List(
                [fnnx.MultiHeadAttention(**attention_kwargs, rngs=rng) for _ in range(3)])

        def __call__(self, x, sow_weights=False):
            x = self.attention_layers[0](x, sow_weights=sow_weights)
            x = self.attention_layers[1](x)
            return self.attention_layers[2](x, sow_weights=sow_weights)

    module = Model(dict(in_features=8, num_heads=8, kernel_init=nnx.initializers.ones_init(),
                        bias_init=nnx.initializers.zeros_init(), deterministic=False), nnx.Rngs(0))
    module.set_attributes(decode=False)
    x = jnp.ones((4, 6, 8))
    module(x, True)
    intermediates = nnx.pop(module, nnx.Intermediate)
    assert intermediates["attention_layers"][0]["attention_weights"].get_value()[0].shape == (4, 8, 6, 6)
    assert 1 not in intermediates["attention_layers"]
    assert intermediates["attention_layers"][2]["attention_weights"].get_value()[0].shape == (4, 8, 6, 6)
    module(x)
    assert not nnx.pop(module, nnx.Intermediate)


def test_autoregressive_decode_with_x64():
    with jax.enable_x64(True):
        x = jnp.ones((1, 4, 4))
        module = fnnx.MultiHeadAttention(in_features=4, num_heads=2, qkv_features=4, decode=True,
                                         rngs=nnx.Rngs(0))
        module.init_cache(x.shape, dtype=x.dtype)
        assert module.cached_key.shape == (1, 4, 2, 2)
        assert module.cached_value.shape == (1, 4, 2, 2)
        y1 = module(x[:, :1, :])
        y2 = module(x[:, 1:2, :])
        assert y1.shape == y2.shape == (1, 1, 4)
        assert module.cache_index[...].dtype == jnp.int32 and int(module.cache_index[...]) == 2


@pytest.mark.parametrize("keep_rngs", [True, False])
def test_keep_rngs(keep_rngs):
    module = fnnx.MultiHeadAttention(in_features=4, num_heads=2, qkv_features=4, decode=True,
                                     rngs=nnx.Rngs(42), dropout_rate=0.5, keep_rngs=keep_rngs)
    assert (module.rngs is not None) == keep_rngs
    if keep_rngs:
        _, _, nondiff = nnx.split(module, nnx.Param, ...)
        assert nondiff["rngs"]["count"].type is nnx.RngCount
        assert nondiff["rngs"]["key"].type is nnx.RngKey
    else:
        nnx.split(module, nnx.Param)


@pytest.mark.parametrize("use_bias,decode,normalize_qk",
                         [(True, False, False), (False, True, False), (True, True, True)])
def test_linen_consistency(use_bias, decode, normalize_qk):
    """flax's TestLinenConsistency: linen MultiHeadDotProductAttention parameters, NNX module."""
    x = jnp.ones((1, 3))
    kw = dict(num_heads=2, qkv_features=6, out_features=6, use_bias=use_bias, decode=decode,
              normalize_qk=normalize_qk)
    model_nnx = fnnx.MultiHeadAttention(in_features=3, **kw, rngs=nnx.Rngs(42))
    model = nn.MultiHeadDotProductAttention(**kw)
    variables = model.init(jax.random.key(42), x)
    fnnx.load_linen_variables(model_nnx, {"params": variables["params"]})
    if decode:
        model_nnx.init_cache(x.shape)
    out, _ = model.apply(variables, x, mutable=["cache"])
    np.testing.assert_allclose(model_nnx(x), out, rtol=1e-6, atol=1e-6)


# --- drop-in parity with flax.nnx.MultiHeadAttention ------------------------------------------

@pytest.mark.parametrize("kw,cross", [
    (dict(qkv_features=16, out_features=6), False),
    (dict(qkv_features=16, in_kv_features=5), True),
    (dict(num_kv_heads=2), False),
    (dict(num_kv_heads=1, out_features=3, normalize_qk=True), True),
])
def test_matches_flax_nnx(kw, cross):
    ours, ref = _pair(**kw)
    assert isinstance(ours, nnx.MultiHeadAttention)
    assert jax.tree.map(np.asarray, _params(ours)).keys() == _params(ref).keys()
    jax.tree.map(np.testing.assert_array_equal, _params(ours), _params(ref))
    q = _x((B, T, E), 1)
    kv = _x((B, S, kw.get("in_kv_features", E)), 2) if cross else None
    mask = np.array(jax.random.bernoulli(jax.random.key(3), 0.6, (B, 1, T, S if cross else T)))
    mask[..., 0] = True  # no dead rows here: flax and we differ only there

    @nnx.jit
    def both(ours, ref):
        calls = (dict(), dict(mask=jnp.asarray(mask)), dict(is_causal=True))
        return [(ours(q, kv, decode=False, **c), ref(q, kv, decode=False, **c)) for c in calls]

    if cross:  # flax aligns a T != S causal diagonal top-left, we bottom-right unless told
        ours.causal_alignment = "top_left"
    for got, want in both(ours, ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_flax_attention_fn_gives_flax_exactly():
    ours, ref = _pair(attention_fn=nnx.dot_product_attention)
    q = _x((B, T, E), 1)
    got, want = nnx.jit(lambda a, b: (a(q, decode=False), b(q, decode=False)))(ours, ref)
    np.testing.assert_array_equal(got, want)
    ours(q, decode=False, sow_weights=True)
    assert nnx.pop(ours, nnx.Intermediate)["attention_weights"].get_value()[0].shape == (B, N, T, T)


def test_fully_masked_rows_give_zeros_and_finite_grads():
    ours, ref = _pair(use_bias=False)
    q = _x((B, T, E), 1)
    mask = jnp.ones((B, 1, T, T), bool).at[:, :, 1].set(False)  # query 1 sees nothing
    out, theirs = nnx.jit(lambda a, b: (a(q, mask=mask), b(q, mask=mask, decode=False)))(ours, ref)
    np.testing.assert_array_equal(out[:, 1], 0.0)
    assert np.abs(theirs[:, 1]).max() > 1e-3  # flax: the mean of the values
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(q, mask=mask) ** 2)))(ours)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


# --- KV cache ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(num_kv_heads=2, relative_position="rope"),
                                dict(window=2, relative_position="alibi")])
def test_cache_decode_equals_full_causal_forward(kw):
    m = fnnx.MultiHeadAttention(N, E, **kw, rngs=nnx.Rngs(0))
    x = _x((B, T, E), 1)
    m.init_cache(x.shape)
    assert nnx.to_pure_dict(nnx.state(m, nnx.Cache)).keys() == {"cached_key", "cached_value", "cache_index"}
    assert m.cache_index[...].shape == ()  # flax's layout

    @nnx.jit
    def run(m):  # a 2-token prefill, then one token per step
        steps = [m(x[:, :2], decode=True)] + [m(x[:, i:i + 1], decode=True) for i in range(2, T)]
        return jnp.concatenate(steps, axis=1), m(x, is_causal=True)

    got, full = run(m)
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
    assert int(m.cache_index[...]) == T


def test_cache_steps_match_flax_decode():
    ours, ref = _pair(num_kv_heads=2, decode=True)
    x = _x((B, 3, E), 1)
    for m in (ours, ref):
        m.init_cache(x.shape)
    # Decoding is causal by position; flax's is_causal=True would hide all but key 0 here.
    step = nnx.jit(lambda a, b, x: (a(x, is_causal=True), b(x)))
    for i in range(3):
        np.testing.assert_allclose(*step(ours, ref, x[:, i:i + 1]), rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_allclose, nnx.to_pure_dict(nnx.state(ours, nnx.Cache)),
                 nnx.to_pure_dict(nnx.state(ref, nnx.Cache)))


def test_ragged_prefill_keeps_per_example_lengths():
    m = fnnx.MultiHeadAttention(N, E, rngs=nnx.Rngs(0))
    x = _x((B, T, E), 1)
    lengths = jnp.array([2, 4])
    m.init_cache(x.shape)

    @nnx.jit
    def run(m):
        m(x[:, :4], decode=True, lengths=lengths)  # right-padded prompts of lengths 2 and 4
        levels = m.cache_index[...], m.cache_lengths[...]
        step = m(x[:, 4:5], decode=True)  # the next token lands at positions 2 and 4
        full = [m(jnp.concatenate([x[b:b + 1, :n], x[b:b + 1, 4:5]], axis=1), is_causal=True)
                for b, n in enumerate([2, 4])]
        return levels, step, full

    (index, per_example), step, full = run(m)
    assert index.shape == () and int(index) == 4  # flax's scalar: the high-water mark
    np.testing.assert_array_equal(per_example, lengths)
    np.testing.assert_array_equal(m.cache_lengths[...], lengths + 1)
    m.init_cache(x.shape)
    assert m.cache_lengths is None  # a fresh cache is flax's three variables again
    for b in range(B):
        np.testing.assert_allclose(step[b], full[b][0, -1:], rtol=1e-5, atol=1e-5)


def test_cross_attention_memory_cached_once():
    m = fnnx.MultiHeadAttention(N, E, in_kv_features=5, rngs=nnx.Rngs(0))
    q, mem = _x((B, 3, E), 1), _x((B, S, 5), 2)

    @nnx.jit
    def run(m):
        first = m(q[:, :1], mem, decode=True, static_kv=True)
        rest = m(q[:, 1:], decode=True, static_kv=True)  # inputs_k=None: reuse the stored memory
        return jnp.concatenate([first, rest], 1), m(q, mem)

    got, full = run(m)
    assert m.cached_key.shape == (B, S, N, E // N)
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)


def test_cache_errors_and_overflow():
    m = fnnx.MultiHeadAttention(N, E, rngs=nnx.Rngs(0))
    x = _x((B, 3, E), 1)
    with pytest.raises(ValueError, match="init_cache"):
        m(x, decode=True)
    m.init_cache(x.shape)
    with pytest.raises(ValueError, match=r"lengths must be in \[0, T=3\]"):
        m(x, decode=True, lengths=jnp.array([1, 4]))
    m(x[:, :2], decode=True)
    with pytest.raises(ValueError, match="past the cache"):
        m(x[:, :2], decode=True)
    before = m.cached_key[...]
    out = nnx.jit(lambda m, x: m(x, decode=True))(m, x[:, :2])  # traced index: no raise
    assert np.isnan(out).all()
    np.testing.assert_array_equal(m.cached_key[...], before)  # never a clamped overwrite


def test_constructor_and_call_errors():
    with pytest.raises(ValueError, match="broadcast_dropout"):
        fnnx.MultiHeadAttention(N, E, dropout_rate=0.1, broadcast_dropout=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="relative_position"):
        fnnx.MultiHeadAttention(N, E, relative_position="rotary", rngs=nnx.Rngs(0))
    m = fnnx.MultiHeadAttention(N, E, dropout_rate=0.1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_features"):
        m(_x((B, T, E + 1), 0), deterministic=True)
    with pytest.raises(ValueError, match="deterministic"):
        m(_x((B, T, E), 0))


# --- training and lifted transforms -----------------------------------------------------------

def test_trains_with_dropout_under_jit_grad_and_optimizer():
    import optax

    m = fnnx.MultiHeadAttention(N, E, dropout_rate=0.2, rngs=nnx.Rngs(0))
    x, y = _x((B, T, E), 1), _x((B, T, E), 2)
    a, b = m(x, deterministic=False), m(x, deterministic=False)
    assert not np.allclose(a, b)  # dropout is live and the kept stream advances
    np.testing.assert_array_equal(m(x, deterministic=True), m(x, deterministic=True))
    opt = nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(m, opt):
        loss, grads = nnx.value_and_grad(
            lambda m: jnp.mean((m(x, is_causal=True, deterministic=False) - y) ** 2))(m)
        opt.update(m, grads)
        return loss

    losses = [float(train_step(m, opt)) for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]


def test_scan_and_vmap_over_stacked_layers():
    layers = 3

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stack(rngs):
        return fnnx.MultiHeadAttention(N, E, num_kv_heads=2, rngs=rngs)

    stacked = stack(nnx.Rngs(0))
    assert stacked.query.kernel.shape == (layers, E, N, E // N)
    x = _x((B, T, E), 1)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def run(layer, h):
        return h + layer(h, is_causal=True)

    got = nnx.jit(run)(stacked, x)
    want = x
    for i in range(layers):
        layer = fnnx.MultiHeadAttention(N, E, num_kv_heads=2, rngs=nnx.Rngs(0))
        nnx.update(layer, jax.tree.map(lambda p: p[i], nnx.state(stacked, nnx.Param)))
        want = want + layer(want, is_causal=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_remat_gives_the_same_gradients():
    m = fnnx.MultiHeadAttention(N, E, num_kv_heads=2, rngs=nnx.Rngs(0))
    x = _x((B, T, E), 1)
    loss = lambda m: jnp.sum(m(x, is_causal=True) ** 2)  # noqa: E731
    remat_loss = lambda m: jnp.sum(nnx.remat(lambda m, x: m(x, is_causal=True))(m, x) ** 2)  # noqa: E731
    plain, remat = nnx.jit(lambda m: (nnx.grad(loss)(m), nnx.grad(remat_loss)(m)))(m)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), plain, remat)


@pytest.mark.parametrize("dtype", [jnp.bfloat16])  # float16: flax's own module fails under jit on CPU
def test_low_precision_compute_dtype(dtype):
    """flax's consistency test runs a low-precision dtype; we keep the dtype and decode in it."""
    ours, ref = _pair(dtype=dtype, num_kv_heads=2)
    x = _x((B, T, E), 1)
    ours.init_cache(x.shape, dtype)

    @nnx.jit
    def run(a, b):
        steps = [a(x[:, i:i + 1], decode=True) for i in range(T)]
        return jnp.concatenate(steps, 1), a(x, is_causal=True), b(x, is_causal=True, decode=False)

    cached, full, theirs = run(ours, ref)
    assert cached.dtype == full.dtype == dtype
    np.testing.assert_allclose(cached.astype(jnp.float32), full.astype(jnp.float32), atol=2e-2)
    np.testing.assert_allclose(full.astype(jnp.float32), theirs.astype(jnp.float32), atol=3e-2)
