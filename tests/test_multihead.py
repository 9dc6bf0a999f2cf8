"""MultiHeadAttention: parity with flax, GQA semantics, KV cache, sown weights."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention import (
    MultiHeadAttention,
    PositionwiseFeedForward,
    key_mask,
    scaled_dot_product_attention,
)
from module_helpers import japply, jinit

B, T, S, E, N = 2, 5, 7, 16, 4



def _x(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _random_mask(shape, seed):
    """Random boolean mask whose every row keeps key 0 (flax and we differ only on empty rows)."""
    m = np.array(jax.random.bernoulli(jax.random.key(seed), 0.6, shape))
    m[..., 0] = True
    return jnp.asarray(m)


@pytest.mark.parametrize("cross", [False, True])
def test_matches_flax_multihead_dot_product_attention(cross):
    q = _x((B, T, E), 0)
    kv = _x((B, S, 12), 1) if cross else None
    ref = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=24, out_features=10)
    ref_vars = jinit(ref, q, kv, seed=3)
    ours = MultiHeadAttention(num_heads=N, qkv_features=24, out_features=10)
    # Same parameter tree layout, so flax's params drop in unchanged.
    ours_vars = jax.eval_shape(lambda: ours.init(jax.random.key(0), q, kv))
    assert jax.tree.map(jnp.shape, ours_vars) == jax.tree.map(jnp.shape, ref_vars)
    for mask in (None, _random_mask((B, 1, T, S if cross else T), 2)):
        got, want = jax.jit(lambda v: (ours.apply(v, q, kv, mask=mask), ref.apply(v, q, kv, mask=mask)))(
            ref_vars)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    k = 2  # G = N // K = 2: query head n reads kv head n // 2
    x = _x((B, T, E), 0)
    gqa = MultiHeadAttention(num_heads=N, num_kv_heads=k)
    params = jinit(gqa, x, seed=1)["params"]
    assert params["key"]["kernel"].shape == (E, k, E // N)
    assert params["value"]["kernel"].shape == (E, k, E // N)
    assert params["query"]["kernel"].shape == (E, N, E // N)
    out = japply(gqa, {"params": params}, x, is_causal=True)
    assert out.shape == (B, T, E)
    # Repeat each kv head G times: an ordinary MHA with those weights must agree.
    rep = lambda a: jnp.repeat(a, N // k, axis=-2)  # noqa: E731
    mha_params = dict(params)
    for name in ("key", "value"):
        mha_params[name] = {p: rep(v) for p, v in params[name].items()}
    mha = MultiHeadAttention(num_heads=N, num_kv_heads=N)
    np.testing.assert_allclose(
        japply(mha, {"params": mha_params}, x, is_causal=True), out, rtol=1e-5, atol=1e-6)


def test_shape_multiple_batch_dims_and_head_dim():
    x = _x((2, 3, T, E), 0)
    m = MultiHeadAttention(num_heads=N, num_kv_heads=1, head_dim=6, out_features=9)
    v = jax.eval_shape(lambda: m.init(jax.random.key(0), x))
    assert v["params"]["query"]["kernel"].shape == (E, N, 6)
    assert v["params"]["key"]["kernel"].shape == (E, 1, 6)
    assert jax.eval_shape(lambda v_: m.apply(v_, x), v).shape == (2, 3, T, 9)


def test_bad_head_settings_raise():
    x = _x((B, T, E), 0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiHeadAttention(num_heads=4, num_kv_heads=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiHeadAttention(num_heads=3).init(jax.random.key(0), x)


def test_sow_weights_only_when_asked():
    x = _x((B, T, E), 0)
    m = MultiHeadAttention(num_heads=N)
    v = jinit(m, x)
    _, state = japply(m, v, x, mutable=["intermediates"])
    assert "intermediates" not in state or not state["intermediates"]
    mask = key_mask(jnp.arange(T) < 3)
    _, state = japply(m, v, x, mask=mask, sow_weights=True, mutable=["intermediates"])
    (w,) = state["intermediates"]["attention_weights"]
    assert w.shape == (B, N, T, T)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.asarray(w)[..., 3:] == 0.0)


def test_dropout_changes_output_and_is_reproducible():
    x = _x((B, T, E), 0)
    m = MultiHeadAttention(num_heads=N, dropout_rate=0.5)
    v = jinit(m, x, deterministic=True)
    det = japply(m, v, x, deterministic=True)
    drop = jax.jit(lambda key: m.apply(v, x, deterministic=False, rngs={"dropout": key}))
    a, b, c = drop(jax.random.key(1)), drop(jax.random.key(1)), drop(jax.random.key(2))
    assert not np.allclose(a, det)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_bfloat16_output_dtype():
    x = _x((B, T, E), 0).astype(jnp.bfloat16)
    m = MultiHeadAttention(num_heads=N, dtype=jnp.bfloat16)
    v = jinit(m, x)
    assert japply(m, v, x, is_causal=True).dtype == jnp.bfloat16


# ----------------------------------------------------------------- KV cache

L = 8  # cache length; 7 positions are decoded


def _decode(m, params, x, mask, chunks):
    """Feeds x [B, 7, E] to the cache in `chunks` (prefill, then steps)."""
    cache = jinit(m, jnp.zeros((B, L, E)), decode=True)["cache"]
    step = jax.jit(lambda c, xs: m.apply({"params": params, "cache": c}, xs, mask=mask,
                                         decode=True, mutable=["cache"]))
    outs, start = [], 0
    for size in chunks:
        out, state = step(cache, x[:, start:start + size])
        cache = state["cache"]
        outs.append(out)
        start += size
    assert cache["cache_index"].shape == () and int(cache["cache_index"]) == start  # flax's layout
    return jnp.concatenate(outs, axis=1)


def test_cache_prefill_then_steps_equals_full_causal_pass():
    x = _x((B, 7, E), 0)
    m = MultiHeadAttention(num_heads=N, num_kv_heads=2)  # GQA: the cache holds K = 2 heads
    params = jinit(m, x, seed=1)["params"]
    # Key padding over the cache slots: example 1's first position is padding.
    valid = jnp.ones((B, L), bool).at[1, 0].set(False)
    full = japply(m, {"params": params}, x, mask=key_mask(valid[:, :7]), is_causal=True)
    got = _decode(m, params, x, key_mask(valid), chunks=[3, 1, 1, 1, 1])
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)


def test_cache_works_under_jit():
    x = _x((B, 7, E), 0)
    m = MultiHeadAttention(num_heads=N)
    params = jinit(m, x, seed=1)["params"]
    cache = jinit(m, jnp.zeros((B, L, E)), decode=True)["cache"]
    step = jax.jit(lambda c, xs: m.apply({"params": params, "cache": c}, xs, decode=True,
                                         mutable=["cache"]))
    outs = []
    for t in range(7):
        out, state = step(cache, x[:, t:t + 1])
        cache = state["cache"]
        outs.append(out)
    full = japply(m, {"params": params}, x, is_causal=True)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
    # Past the end under jit: cannot raise, so the output is poisoned with NaN.
    out, state = step(cache, x[:, :1])  # slot 7 of 8: still fits
    assert np.all(np.isfinite(out))
    full_cache = state["cache"]
    out, state = step(full_cache, x[:, 1:2])
    assert np.all(np.isnan(out))
    # ... and the cache is not corrupted: no clamped write over slot 7; the index
    # moves past L, so every later step stays NaN (no extra flag variable).
    for name in ("cached_key", "cached_value"):
        np.testing.assert_array_equal(state["cache"][name], full_cache[name])
    assert int(full_cache["cache_index"]) == L and int(state["cache"]["cache_index"]) > L
    out, _ = step(state["cache"], x[:, 2:3])
    assert np.all(np.isnan(out))


def test_cache_errors():
    x = _x((B, 3, E), 0)
    m = MultiHeadAttention(num_heads=N)
    params = jinit(m, x, seed=1)["params"]
    cache = m.init(jax.random.key(0), jnp.zeros((B, 4, E)), decode=True)["cache"]
    assert cache["cached_key"].shape == cache["cached_value"].shape == (B, 4, N, E // N)
    assert not np.any(cache["cache_index"]) and not np.any(cache["cached_key"])
    assert set(cache) == {"cached_key", "cached_value", "cache_index"} and cache["cache_index"].shape == ()
    # Eager calls: every check fires before any projection is computed.
    apply = lambda c, xs, kv=None: m.apply({"params": params, "cache": c}, xs, kv,  # noqa: E731
                                           decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match="cannot fit"):
        apply(cache, _x((B, 5, E), 0))
    with pytest.raises(ValueError, match="past the cache"):
        apply({**cache, "cache_index": jnp.array(3, jnp.int32)}, x[:, :2])
    with pytest.raises(ValueError, match="batch dims"):
        apply(cache, x[:1])
    with pytest.raises(ValueError, match="no 'cache' collection"):
        m.apply({"params": params}, x, decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match="self-attention"):
        apply(cache, x[:, :1], x)


# ------------------------------------------------- drop-in for flax's module

def _pair(**kw):
    """Flax's module and ours with the same settings, and flax-initialised variables."""
    return nn.MultiHeadDotProductAttention(num_heads=N, **kw), MultiHeadAttention(num_heads=N, **kw)


def test_flax_call_patterns_give_flax_outputs():
    q, k, v = _x((B, T, E), 0), _x((B, S, E), 1), _x((B, S, E), 2)  # one tree for self and cross
    tokens = jnp.array([[3, 4, 5, 0, 0], [6, 7, 8, 9, 1]])  # make_causal_mask reads only the shape
    kv_valid = jnp.arange(S)[None] < jnp.array([[4], [7]])
    for kw in ({}, {"normalize_qk": True, "qkv_features": 24, "out_features": 9}):
        ref, ours = _pair(**kw)
        variables = jinit(ref, q, k, v, seed=3)
        # Same parameter tree, normalize_qk's query_ln/key_ln included.
        assert jax.tree.map(jnp.shape, jax.eval_shape(lambda: ours.init(jax.random.key(0), q, k, v))) \
            == jax.tree.map(jnp.shape, variables)
        calls = [
            ((q,), {}),                                                    # self-attention
            ((q,), {"mask": nn.make_causal_mask(tokens)}),                 # causal, [B, 1, T, T]
            # Cross-attention with a key padding mask (every query row keeps a key:
            # on empty rows flax averages all values, we output zeros).
            ((q, k, v), {"mask": nn.make_attention_mask(jnp.ones((B, T), bool), kv_valid)}),
            ((q, k), {}),                                                  # inputs_v = inputs_k
            ((q,), {"inputs_kv": k}),                                      # deprecated alias
            ((q,), {"deterministic": True, "sow_weights": False}),
        ]
        for args, kwargs in calls:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                want = japply(ref, variables, *args, **kwargs)
                got = japply(ours, variables, *args, **kwargs)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(kwargs.keys()))


def test_flax_attention_fn_and_sown_weights():
    q, kv = _x((B, T, E), 0), _x((B, S, E), 1)
    ref = nn.MultiHeadDotProductAttention(num_heads=N)
    variables = jinit(ref, q, kv, seed=4)
    ours = MultiHeadAttention(num_heads=N, attention_fn=nn.dot_product_attention, scale=0.3)
    plain = MultiHeadAttention(num_heads=N, scale=0.3)
    # flax's function takes no scale: it is folded into the query.
    np.testing.assert_allclose(japply(ours, variables, q, kv), japply(plain, variables, q, kv),
                               rtol=1e-5, atol=1e-5)
    # GQA keys are repeated for a function that expects N heads; causality becomes a mask.
    gqa = MultiHeadAttention(num_heads=N, num_kv_heads=2, attention_fn=nn.dot_product_attention)
    gv = jinit(gqa, q, seed=5)
    np.testing.assert_allclose(
        japply(gqa, gv, q, is_causal=True),
        japply(MultiHeadAttention(num_heads=N, num_kv_heads=2), gv, q, is_causal=True), rtol=1e-5, atol=1e-5)
    # sow_weights=True as a call argument, like flax: the weights land in 'intermediates'.
    for m in (ref, MultiHeadAttention(num_heads=N)):
        _, state = japply(m, variables, q, kv, sow_weights=True, mutable=["intermediates"])
        assert state["intermediates"]["attention_weights"][0].shape == (B, N, T, S)


def test_flax_decode_attribute_loop():
    """flax's own pattern: decode=True attribute, init on the full length, one token per apply."""
    x = _x((B, 6, E), 0)
    ref = nn.MultiHeadDotProductAttention(num_heads=N, decode=True)
    ours = MultiHeadAttention(num_heads=N, decode=True)
    variables = jinit(ref, x, seed=6)
    params = variables["params"]
    full = japply(MultiHeadAttention(num_heads=N), {"params": params}, x, is_causal=True)
    for m in (ref, ours):
        cache = m.init(jax.random.key(0), x)["cache"]
        step = jax.jit(lambda c, xs, m=m: m.apply({"params": params, "cache": c}, xs, mutable=["cache"]))
        outs = []
        for i in range(6):
            out, state = step(cache, x[:, i:i + 1])
            cache = state["cache"]
            outs.append(out)
        np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_deterministic_follows_flax():
    x = _x((B, T, E), 0)
    for m in (MultiHeadAttention(num_heads=N, dropout_rate=0.1), PositionwiseFeedForward(32, dropout_rate=0.1)):
        v = jinit(m, x, deterministic=True)
        with pytest.raises(ValueError, match="deterministic"):
            m.apply(v, x)  # neither attribute nor argument: no silent default
        with pytest.raises(ValueError, match="deterministic"):
            m.clone(deterministic=True).apply(v, x, deterministic=False)  # both: flax refuses too
        np.testing.assert_array_equal(m.clone(deterministic=True).apply(v, x), m.apply(v, x, deterministic=True))
    # Without dropout nothing is required (as flax).
    m = MultiHeadAttention(num_heads=N)
    japply(m, jinit(m, x), x)


def test_function_options_pass_through():
    x = _x((B, 9, E), 0)
    params = jinit(MultiHeadAttention(num_heads=N), x, seed=7)
    p = params["params"]
    q = jnp.einsum("bte,enh->btnh", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = jnp.einsum("bte,enh->btnh", x, p["key"]["kernel"]) + p["key"]["bias"]
    val = jnp.einsum("bte,enh->btnh", x, p["value"]["kernel"]) + p["value"]["bias"]
    opts = dict(window=(2, 1), scale=0.2, implementation="chunked")
    want = scaled_dot_product_attention(q, k, val, is_causal=True, **opts)
    want = jnp.einsum("btnh,nhe->bte", want, p["out"]["kernel"]) + p["out"]["bias"]
    got = japply(MultiHeadAttention(num_heads=N, **opts), params, x, is_causal=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The window also holds in cached decoding (positions are per example).
    m = MultiHeadAttention(num_heads=N, window=2)
    full = japply(m, params, x, is_causal=True)
    cache = jinit(m, x, decode=True)["cache"]
    step = jax.jit(lambda c, xs: m.apply({"params": p, "cache": c}, xs, decode=True, mutable=["cache"]))
    out1, state = step(cache, x[:, :5])
    out2, _ = step(state["cache"], x[:, 5:])
    np.testing.assert_allclose(jnp.concatenate([out1, out2], 1), full, rtol=1e-5, atol=1e-5)


def test_static_kv_caches_cross_attention_memory():
    q, mem = _x((B, 4, E), 0), _x((B, S, E), 1)
    m = MultiHeadAttention(num_heads=N, num_kv_heads=2)
    v = jinit(m, q, mem, seed=8)
    want = japply(m, v, q, mem)
    first, state = m.apply(v, q[:, :1], mem, decode=True, static_kv=True, mutable=["cache"])
    assert state["cache"]["cached_key"].shape == (B, S, 2, E // N)
    rest, _ = m.apply({**v, **state}, q[:, 1:], decode=True, static_kv=True, mutable=["cache"])
    np.testing.assert_allclose(jnp.concatenate([first, rest], 1), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="earlier call"):
        m.apply(v, q, decode=True, static_kv=True, mutable=["cache"])


def test_cache_decoding_in_64_bit_mode():
    x = _x((B, 7, E), 0)
    m = MultiHeadAttention(num_heads=N, relative_position="rope")
    params = jinit(m, x, seed=1)["params"]
    want = _decode(m, params, x, None, chunks=[3, 1, 1, 1, 1])
    with jax.enable_x64(True):
        got = _decode(m, params, x, None, chunks=[3, 1, 1, 1, 1])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_mixed_precision_promotes_like_flax():
    # bf16 parameters and queries, float32 memory: flax promotes and returns float32;
    # the module raised "cast key to bfloat16" (the functions stay strict).
    q, mem = _x((B, T, E), 0).astype(jnp.bfloat16), _x((B, S, E), 1)
    ref, ours = _pair(param_dtype=jnp.bfloat16)
    variables = jinit(ref, q, mem, seed=2)
    want = japply(ref, variables, q, mem)
    got = japply(ours, variables, q, mem)
    assert got.dtype == want.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


def _doubling_dot_general(*args, **kwargs):
    return 2.0 * jax.lax.dot_general(*args, **kwargs)


def _halving_einsum(*args, **kwargs):
    return 0.5 * jnp.einsum(*args, **kwargs)


_HALVING = dict(qk_attn_weights_einsum_cls=lambda: _halving_einsum,
                attn_weights_value_einsum_cls=lambda: _halving_einsum)


@pytest.mark.parametrize("attributes", [
    dict(qkv_dot_general=_doubling_dot_general),
    dict(out_dot_general=_doubling_dot_general),
    dict(qkv_dot_general_cls=lambda: _doubling_dot_general),
    dict(out_dot_general_cls=lambda: _doubling_dot_general),
    _HALVING,
], ids=lambda a: "+".join(a))
def test_flax_projection_and_einsum_attributes_take_effect(attributes):
    # These six flax attributes raised TypeError; each must act as in flax.
    q = _x((B, T, E), 0)
    ref, ours = _pair(**attributes)
    variables = jinit(ref, q, seed=3)
    want, plain = japply(ref, variables, q), japply(MultiHeadAttention(num_heads=N), variables, q)
    assert not np.allclose(want, plain, atol=1e-3)  # the attribute changes flax's output ...
    np.testing.assert_allclose(japply(ours, variables, q), want, rtol=1e-5, atol=1e-5)  # ... and ours alike
    if attributes is _HALVING:  # flax's rule: both einsums or neither
        with pytest.raises(ValueError, match="together"):
            MultiHeadAttention(num_heads=N, qk_attn_weights_einsum_cls=lambda: _halving_einsum).init(
                jax.random.key(0), q)


def test_einsum_attention_dropout_needs_an_rng():
    from flax_attention.functional.custom_attention import einsum_attention
    q = _x((B, T, N, 8), 0)
    with pytest.raises(ValueError, match="needs a dropout_rng"):
        einsum_attention(q, q, q, dropout_rate=0.5, deterministic=False)
