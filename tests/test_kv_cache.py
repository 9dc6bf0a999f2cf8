"""The decode cache: flax's variables exactly, flax's own decode tests, ragged prompts as an addition.

The tests marked "ported from flax" follow flax's
``tests/linen/linen_attention_test.py`` (``test_decoding``,
``test_autoregressive_decode_with_x64``, ``test_autoregresive_receptive_field_1d``)
and the GQA decode pattern of ``tests/nnx/nn/attention_test.py``, run against
:class:`flax_attention.MultiHeadAttention`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import jax_utils
from flax.core import pop

from flax_attention import MultiHeadAttention
from module_helpers import japply, jinit

B, E, N = 2, 16, 4


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _steps(m, variables, x, sizes, **kw):
    """Feeds ``x`` to the cache in chunks of ``sizes`` (jitted); returns ``(outputs, cache)``."""
    step = jax.jit(lambda v, xs, kw: m.apply(v, xs, mutable=["cache"], **kw))
    cache, outs, start = variables["cache"], [], 0
    for i, size in enumerate(sizes):
        out, state = step({"params": variables["params"], "cache": cache}, x[:, start:start + size],
                          kw if i == 0 else {})
        cache, start = state["cache"], start + size
        outs.append(out)
    return jnp.concatenate(outs, 1), cache


def test_cache_variables_and_values_are_flaxs():
    x = _x((B, 6, E))
    ref = nn.MultiHeadDotProductAttention(num_heads=N, decode=True)
    ours = MultiHeadAttention(num_heads=N, decode=True)
    want = ref.init(jax.random.key(0), x)
    got = ours.init(jax.random.key(0), x)
    spec = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
    assert spec(got["cache"]) == spec(want["cache"])  # same names, shapes, dtypes: nothing more
    variables = {"params": want["params"], "cache": want["cache"]}
    ref_out, ref_cache = _steps(ref, variables, x, [1] * 4)
    out, cache = _steps(ours, variables, x, [1] * 4)
    assert int(cache["cache_index"]) == int(ref_cache["cache_index"]) == 4  # flax code reads it so
    for name in ("cached_key", "cached_value"):
        np.testing.assert_allclose(cache[name], ref_cache[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    # A cache flax's module filled drops into ours (and back): continue for two more steps.
    tail = lambda m, c: _steps(m, {"params": want["params"], "cache": c}, x[:, 4:], [1, 1])[0]  # noqa: E731
    np.testing.assert_allclose(tail(ours, ref_cache), tail(ref, cache), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial_shape, attn_dims", [((5,), (1,)), ((6, 5), (2,))])
def test_decoding_ported_from_flax(spatial_shape, attn_dims):
    bs, num_heads, num_features = 2, 3, 4
    key1, key2 = jax.random.split(jax.random.key(0))
    inputs = jax.random.normal(key1, (bs,) + spatial_shape + (num_heads * num_features,))
    module = MultiHeadAttention(num_heads=num_heads, qkv_features=num_heads * num_features,
                                precision=jax.lax.Precision.HIGHEST, deterministic=False, decode=False)
    decode_module = module.clone(decode=True)
    initial_vars = decode_module.init(key2, inputs)
    state, params = pop(initial_vars, "params")
    causal_mask = nn.attention.make_causal_mask(jnp.ones((bs,) + spatial_shape))
    y_ref = jax.jit(lambda x, y: module.apply(initial_vars, x, mask=y))(inputs, causal_mask)

    def body_fn(state, x):
        y, state = decode_module.apply({"params": params, **state}, x, mutable=["cache"])
        return state, y

    _, y = jax_utils.scan_in_dim(body_fn, state, inputs, axis=attn_dims, keepdims=True)
    np.testing.assert_allclose(y_ref, y, atol=1e-5)


def test_autoregressive_decode_with_x64_ported_from_flax():
    with jax.enable_x64(True):
        x = jnp.ones((1, 4, 4))
        module = MultiHeadAttention(num_heads=2, qkv_features=4, decode=True)
        variables = module.init(jax.random.PRNGKey(0), x, x, x)
        params, cache = variables["params"], variables["cache"]
        y1, updates = module.apply({"params": params, "cache": cache}, x[:, :1, :], mutable=["cache"])
        y2, updates = module.apply({"params": params, "cache": updates["cache"]}, x[:, 1:2, :],
                                   mutable=["cache"])
        assert y1.shape == y2.shape == (1, 1, 4)
        assert int(updates["cache"]["cache_index"]) == 2


def test_autoregressive_receptive_field_ported_from_flax():
    length = 10
    inputs = jax.random.normal(jax.random.key(2), (1, length, 1))
    module = MultiHeadAttention(num_heads=1, kernel_init=jax.nn.initializers.ones, deterministic=False)
    initial_vars = module.init(jax.random.key(1), inputs)
    causal_mask = nn.attention.make_causal_mask(jnp.ones((1, length)))
    grad_fn = jax.jit(jax.grad(lambda x, pos: module.apply(initial_vars, x, mask=causal_mask)[0, pos].sum()))
    for i in range(length):
        deps = np.any(np.abs(grad_fn(inputs, i)[0]) > 1e-5, axis=-1)
        assert deps[:i + 1].all() and not deps[i + 1:].any(), i


def test_gqa_decode_keeps_flaxs_scalar_index():
    """The NNX GQA pattern: K < N kv heads cached, one token per call, ``int(cache_index)``."""
    x = _x((B, 5, E))
    m = MultiHeadAttention(num_heads=N, num_kv_heads=2, decode=True)
    variables = jinit(m, x, seed=1)
    assert variables["cache"]["cached_key"].shape == (B, 5, 2, E // N)
    full = japply(m.clone(decode=False), {"params": variables["params"]}, x, is_causal=True)
    out, cache = _steps(m, variables, x, [1] * 5)
    assert int(cache["cache_index"]) == 5 and set(cache) == {"cached_key", "cached_value", "cache_index"}
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-5)


def test_ragged_prefill_adds_per_example_lengths():
    x = _x((B, 6, E))
    m = MultiHeadAttention(num_heads=N, decode=True)
    variables = jinit(m, x, seed=1)
    lengths = jnp.array([1, 3], jnp.int32)
    out, cache = _steps(m, variables, x, [3, 1, 1], lengths=lengths)
    np.testing.assert_array_equal(cache["cache_lengths"], [3, 5])
    assert int(cache["cache_index"]) == 5  # the scalar is the high-water mark
    # Example 0 had one real prompt token: its step outputs are those of its own sequence
    # (x0[0], x0[3], x0[4]), not of the padding columns the prefill wrote.
    own = jnp.concatenate([x[:1, :1], x[:1, 3:5]], 1)
    want = japply(m.clone(decode=False), {"params": variables["params"]}, own, is_causal=True)
    np.testing.assert_allclose(out[0, [0, 3, 4]], want[0], rtol=1e-5, atol=1e-5)


def test_decode_lengths_are_validated():
    x = _x((B, 3, E))
    m = MultiHeadAttention(num_heads=N, decode=True)
    variables = jinit(m, jnp.zeros((B, 8, E)), seed=1)
    apply = lambda v, lengths: m.apply(v, x, lengths=lengths, mutable=["cache"])  # noqa: E731
    for bad in ([5, 3], [-2, 3]):
        with pytest.raises(ValueError, match=r"\[0, T=3\]"):
            apply(variables, jnp.array(bad))
    with pytest.raises(ValueError, match="integers"):
        apply(variables, jnp.array([2.7, 3.0]))
    with pytest.raises(ValueError, match=r"batch shape \(2,\)"):
        apply(variables, jnp.array([1, 2, 3]))
    # Under jit they cannot raise: the bad example is NaN and its cache untouched; the other is exact.
    out, state = jax.jit(apply)(variables, jnp.array([5, 2]))
    good, good_state = jax.jit(apply)(variables, jnp.array([3, 2]))
    assert np.all(np.isnan(out[0])) and not np.any(np.isnan(out[1]))
    np.testing.assert_allclose(out[1], good[1], rtol=1e-6)
    assert not np.any(state["cache"]["cached_key"][0])
    assert int(state["cache"]["cache_lengths"][0]) > 8  # past L: its later steps stay NaN


def test_decode_mode_is_decided_once_from_flax_arguments():
    from flax_attention.functional.kv_cache import DecodeMode, decode_mode
    assert decode_mode(False, False, True) is DecodeMode.OFF
    assert decode_mode(False, True, False) is DecodeMode.OFF  # static_kv means nothing without decode
    assert decode_mode(True, False, True) is DecodeMode.APPEND
    assert decode_mode(True, False, False) is DecodeMode.APPEND  # self-attention: inputs_k defaults to inputs_q
    assert decode_mode(True, True, True) is DecodeMode.STORE
    assert decode_mode(True, True, False) is DecodeMode.REUSE
