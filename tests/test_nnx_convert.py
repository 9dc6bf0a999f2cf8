"""Linen variables <-> NNX state: every flax_attention.nnx module gives its linen twin's outputs, both ways."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax_attention as fa
import flax_attention.nnx as fnnx
from module_helpers import japply, jinit

B, T, S, E, N = 2, 5, 7, 8, 4


def _x(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _both_ways(linen, nnx_module, args, call=lambda m, *a: m(*a), **kw):
    """linen -> NNX and NNX -> linen give the same outputs as the source module."""
    variables = jinit(linen, *args, seed=1, **kw)
    fnnx.load_linen_variables(nnx_module, variables)
    run = nnx.jit(lambda m, *a: call(m, *a))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 run(nnx_module, *args), japply(linen, variables, *args, **kw))
    # Back: fresh NNX parameters, exported to linen, must drive the linen module identically.
    nnx.update(nnx_module, jax.tree.map(lambda p: p + 0.01, nnx.state(nnx_module, nnx.Param)))
    back = fnnx.linen_variables(nnx_module)
    assert jax.tree.map(jnp.shape, back) == jax.tree.map(jnp.shape, variables)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 japply(linen, back, *args, **kw), run(nnx_module, *args))


@pytest.mark.parametrize("kw", [dict(), dict(num_kv_heads=2, normalize_qk=True, out_features=3),
                                dict(relative_position="rope", use_bias=False)])
def test_multihead_attention(kw):
    x = _x((B, T, E), 0)
    linen = fa.MultiHeadAttention(num_heads=N, qkv_features=16, **kw)
    ours = fnnx.MultiHeadAttention(N, E, 16, **kw, rngs=nnx.Rngs(0))
    _both_ways(linen, ours, (x,), call=lambda m, x: m(x, is_causal=True), is_causal=True)


def test_multihead_cross_attention():
    q, kv = _x((B, T, E), 0), _x((B, S, 5), 1)
    linen = fa.MultiHeadAttention(num_heads=N)
    ours = fnnx.MultiHeadAttention(N, E, in_kv_features=5, rngs=nnx.Rngs(0))
    _both_ways(linen, ours, (q, kv))


@pytest.mark.parametrize("name", ["ffn", "additive", "bahdanau"])
def test_feed_forward_and_additive_modules(name):
    x, q = _x((B, S, E), 0), _x((B, T, 6), 1)
    if name == "ffn":
        _both_ways(fa.PositionwiseFeedForward(d_ff=16, out_features=5),
                   fnnx.PositionwiseFeedForward(E, 16, 5, rngs=nnx.Rngs(0)), (x,))
    elif name == "additive":
        mask = jnp.arange(S) < jnp.array([[3], [S]])
        _both_ways(fa.AdditiveAttention(attention_size=7),
                   fnnx.AdditiveAttention(E, 7, rngs=nnx.Rngs(0)), (x, mask))
    else:
        _both_ways(fa.BahdanauAttention(attention_size=7),
                   fnnx.BahdanauAttention(6, E, 7, rngs=nnx.Rngs(0)), (q, x))


def test_decoding_cache_moves_both_ways():
    x = _x((B, T, E), 0)
    linen = fa.MultiHeadAttention(num_heads=N, num_kv_heads=2)
    variables = jinit(linen, x, decode=True, seed=1)
    prefill = jax.jit(lambda v, x: linen.apply(v, x, decode=True, mutable=["cache"]))
    _, cache = prefill(variables, x[:, :3])
    ours = fnnx.MultiHeadAttention(N, E, num_kv_heads=2, rngs=nnx.Rngs(0))
    # flax's scalar cache_index, or an older linen cache's per-example one: both load.
    ours.init_cache(x.shape)
    fnnx.load_linen_variables(ours, {"params": variables["params"], **cache})
    step = nnx.jit(lambda m, x: m(x, decode=True))
    got = step(ours, x[:, 3:4])
    want, cache = prefill({"params": variables["params"], **cache}, x[:, 3:4])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    back = fnnx.linen_variables(ours)  # NNX -> linen after the step: the next step agrees again
    want, _ = prefill(back, x[:, 4:5])
    np.testing.assert_allclose(step(ours, x[:, 4:5]), want, rtol=1e-6, atol=1e-6)


def test_ragged_linen_cache_loads_with_per_example_lengths():
    x = _x((B, T, E), 0)
    lengths = jnp.array([2, 3])
    linen = fa.MultiHeadAttention(num_heads=N)
    variables = jinit(linen, x, decode=True, seed=1)
    prefill = jax.jit(lambda v, x, n: linen.apply(v, x, decode=True, lengths=n, mutable=["cache"]))
    _, cache = prefill(variables, x[:, :3], lengths)  # right-padded prompts of lengths 2 and 3
    ours = fnnx.MultiHeadAttention(N, E, rngs=nnx.Rngs(0))
    ours.init_cache(x.shape)
    fnnx.load_linen_variables(ours, {"params": variables["params"], **cache})
    np.testing.assert_array_equal(ours.cache_lengths[...], lengths)
    assert int(ours.cache_index[...]) == 3
    exported = fnnx.linen_variables(ours)["cache"]  # the layout flax's scalar index + lengths
    assert exported.keys() == {"cached_key", "cached_value", "cache_index", "cache_lengths"}
    step = nnx.jit(lambda m, x: m(x, decode=True))
    linen_step = jax.jit(lambda v, x: linen.apply(v, x, decode=True, mutable=["cache"]))
    got = step(ours, x[:, 3:4])
    want, _ = linen_step({"params": variables["params"], **cache}, x[:, 3:4])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    if "cache_lengths" in cache["cache"]:  # a linen module with this layout reads the way back too
        want, _ = linen_step(fnnx.linen_variables(ours), x[:, 4:5])
        np.testing.assert_allclose(step(ours, x[:, 4:5]), want, rtol=1e-6, atol=1e-6)
    ours.init_cache(x.shape)  # and a non-ragged cache drops the lengths again
    ours.cache_lengths = nnx.Cache(lengths)
    fnnx.load_linen_variables(ours, {"cache": _fresh_cache(ours)})
    assert ours.cache_lengths is None


def _fresh_cache(m):
    c = fnnx.linen_variables(m)["cache"]
    return {k: v for k, v in c.items() if k != "cache_lengths"}


def test_partitioned_linen_parameters_are_unboxed():
    import flax.linen as nn

    x = _x((B, T, E), 0)
    linen = fa.MultiHeadAttention(num_heads=N)
    variables = jinit(linen, x, seed=1)
    boxed = jax.tree.map(lambda p: nn.LogicallyPartitioned(p, (None,) * p.ndim), variables)
    ours = fnnx.load_linen_variables(fnnx.MultiHeadAttention(N, E, rngs=nnx.Rngs(0)), boxed)
    jax.tree.map(np.testing.assert_array_equal, fnnx.linen_variables(ours), variables)


def test_load_errors_name_the_problem():
    x = _x((B, T, E), 0)
    variables = jinit(fa.MultiHeadAttention(num_heads=N), x)
    wrong = fnnx.MultiHeadAttention(N, E, 16, rngs=nnx.Rngs(0))
    before = fnnx.linen_variables(wrong)
    with pytest.raises(ValueError, match=r"\['query'\]\['kernel'\]: expected float32\[8, 4, 4\]"):
        fnnx.load_linen_variables(wrong, variables)
    jax.tree.map(np.testing.assert_array_equal, fnnx.linen_variables(wrong), before)  # untouched
    with pytest.raises(ValueError, match="missing .*query_ln"):
        fnnx.load_linen_variables(fnnx.MultiHeadAttention(N, E, normalize_qk=True, rngs=nnx.Rngs(0)),
                                  variables)
    with pytest.raises(ValueError, match="intermediates"):
        fnnx.load_linen_variables(wrong, {"intermediates": {}})
    ours = fnnx.MultiHeadAttention(N, E, rngs=nnx.Rngs(0))
    ours.init_cache(x.shape)
    cache = jax.tree.map(np.asarray, fnnx.linen_variables(ours)["cache"])
    cache["cache_overflow"] = np.array([False, True])
    with pytest.raises(ValueError, match="overflow"):
        fnnx.load_linen_variables(ours, {"cache": cache})
