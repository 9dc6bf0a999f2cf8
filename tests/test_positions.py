"""RoPE and ALiBi: the pure maths, and cached decoding == full forward with them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention import MultiHeadAttention, Transformer, TransformerConfig, init_cache
from flax_attention.functional.positions import alibi_bias, alibi_slopes, apply_rotary
from module_helpers import japply, jinit

B, E, N = 2, 16, 4


def _x(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_rope_score_depends_only_on_position_difference():
    q, k = _x((1, 1, 1, 8), 0), _x((1, 1, 1, 8), 1)  # [B, T, N, H]

    def score(m, n):
        return float(jnp.sum(apply_rotary(q, jnp.array([[m]])) * apply_rotary(k, jnp.array([[n]]))))

    for m, n in [(0, 3), (5, 2), (7, 7)]:
        for shift in (1, 11, 100):
            np.testing.assert_allclose(score(m + shift, n + shift), score(m, n), rtol=1e-4, atol=1e-4)
    assert abs(score(0, 3) - score(0, 4)) > 1e-3  # ... and it does depend on the difference
    # Position 0 is the identity; every rotation keeps the norm.
    np.testing.assert_allclose(apply_rotary(q, jnp.array([[0]])), q, atol=1e-7)
    np.testing.assert_allclose(jnp.linalg.norm(apply_rotary(q, jnp.array([[9]]))), jnp.linalg.norm(q),
                               rtol=1e-6)


def test_rope_hand_values():
    # H = 4: pair 0 turns by m, pair 1 by m / 100 (theta_1 = 10000^(-2/4)).
    x = jnp.array([1.0, 0.0, 1.0, 0.0]).reshape(1, 1, 1, 4)
    got = np.asarray(apply_rotary(x, jnp.array([[2]]))).ravel()
    np.testing.assert_allclose(got, [np.cos(2), np.sin(2), np.cos(0.02), np.sin(0.02)], rtol=1e-6)


def test_alibi_slopes_and_bias():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    np.testing.assert_allclose(alibi_slopes(2), [2.0 ** -4, 2.0 ** -8])
    # N = 6: the 4 slopes of N = 4, then every other slope of N = 8.
    np.testing.assert_allclose(alibi_slopes(6), [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8,
                                                 2.0 ** -1, 2.0 ** -3])
    bias = np.asarray(alibi_bias(alibi_slopes(2), jnp.arange(3), jnp.arange(3)))
    assert bias.shape == (2, 3, 3)
    np.testing.assert_allclose(bias[0], -(2.0 ** -4) * np.abs(np.arange(3)[:, None] - np.arange(3)))
    np.testing.assert_array_equal(bias, np.swapaxes(bias, -1, -2))  # symmetric distances
    # Directional: keys to the right use the other slopes; the causal part is unchanged.
    slopes = alibi_slopes(2)
    directional = np.asarray(alibi_bias(slopes, jnp.arange(3), jnp.arange(3), slopes[::-1]))
    np.testing.assert_array_equal(np.tril(directional[0]), np.tril(bias[0]))
    np.testing.assert_allclose(directional[0, 0, 2], -2 * 2.0 ** -8)
    np.testing.assert_allclose(directional[1, 0, 2], -2 * 2.0 ** -4)


def test_transformer_alibi_encoder_is_not_mirror_invariant():
    """Symmetric ALiBi + position-free cross-attention maps x and reverse(x) to the same
    decoder input set, so no model could learn `reverse` beyond palindromes."""
    model = Transformer(CFG.replace(position="alibi"))
    v = jinit(model, SRC, TGT)
    src = SRC[:1]
    enc = jax.jit(lambda s: model.apply(v, s, method=Transformer.encode))
    mirrored = np.asarray(enc(src[:, ::-1]))[:, ::-1]
    assert not np.allclose(mirrored, np.asarray(enc(src)), atol=1e-3)
    sym = MultiHeadAttention(num_heads=N, relative_position="alibi")
    x = _x((1, 6, E), 3)
    sv = jinit(sym, x, seed=2)
    np.testing.assert_allclose(japply(sym, sv, x[:, ::-1])[:, ::-1], japply(sym, sv, x), rtol=1e-5, atol=1e-5)
    directional = sym.clone(alibi_directional=True)
    assert not np.allclose(japply(directional, sv, x[:, ::-1])[:, ::-1], japply(directional, sv, x), atol=1e-3)


@pytest.mark.parametrize("relative", ["rope", "alibi"])
def test_attention_decode_equals_full_forward(relative):
    x = _x((B, 7, E), 0)
    m = MultiHeadAttention(num_heads=N, num_kv_heads=2, relative_position=relative)
    params = jinit(m, x, seed=1)["params"]
    full = japply(m, {"params": params}, x, is_causal=True)
    # Relative schemes: shifting every position together changes nothing.
    np.testing.assert_allclose(
        japply(m, {"params": params}, x, is_causal=True, positions=jnp.arange(7) + 13), full,
        rtol=1e-4, atol=1e-5)
    cache = jinit(m, jnp.zeros((B, 9, E)), decode=True)["cache"]
    step = jax.jit(lambda c, xs: m.apply({"params": params, "cache": c}, xs, decode=True, mutable=["cache"]))
    outs, start = [], 0
    for size in (3, 1, 2, 1):
        out, state = step(cache, x[:, start:start + size])
        cache, start = state["cache"], start + size
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)
    plain = MultiHeadAttention(num_heads=N, num_kv_heads=2)
    assert not np.allclose(japply(plain, {"params": params}, x, is_causal=True), full, atol=1e-3)


CFG = TransformerConfig(vocab_size=13, d_model=16, num_heads=4, d_ff=32, num_encoder_layers=1,
                        num_decoder_layers=2, max_len=16)
SRC = jnp.array([[3, 4, 5, 6, 7, 8], [9, 10, 11, 0, 0, 0], [5, 5, 6, 0, 0, 0]])
TGT = jnp.array([[1, 5, 6, 7, 2, 9], [1, 9, 10, 12, 4, 3], [1, 3, 4, 8, 8, 7]])


@pytest.mark.parametrize("position", ["sinusoidal", "rope", "alibi", "none"])
def test_ragged_prompts_decode_like_each_examples_own_forward(position):
    """Right-padded prompts of lengths 1, 3, 2 prefill together, then decode one token a step."""
    model = Transformer(CFG.replace(position=position))
    v = jinit(model, SRC, TGT)
    encode = jax.jit(lambda s: model.apply(v, s, method=Transformer.encode))
    decode = jax.jit(lambda c, tok, enc, s, lengths: model.apply(
        {"params": v["params"], "cache": c}, tok, enc, s, decode=True, lengths=lengths,
        mutable=["cache"], method=Transformer.decode))
    encoded = encode(SRC)
    lengths = np.array([1, 3, 2])
    prompt = np.where(np.arange(3) < lengths[:, None], np.asarray(TGT)[:, :3], 0)  # right padding
    cache = init_cache(model, 3, max_len=8)
    logits0, state = decode(cache, jnp.asarray(prompt), encoded, SRC, jnp.asarray(lengths))
    got = [[logits0[b, lengths[b] - 1]] for b in range(3)]
    cache = state["cache"]
    for step in range(3):  # feed each example's next real token (its own position)
        tok = np.asarray(TGT)[np.arange(3), lengths + step][:, None]
        logits, state = decode(cache, jnp.asarray(tok), None, SRC, jnp.asarray(np.ones(3, np.int32)))
        cache = state["cache"]
        for b in range(3):
            got[b].append(logits[b, 0])
    for b in range(3):  # each example alone, teacher forced on its own prefix
        n = lengths[b] + 3
        full = japply(model, v, SRC[b:b + 1], TGT[b:b + 1, :n])[0]
        np.testing.assert_allclose(np.stack(got[b]), full[lengths[b] - 1:n], rtol=1e-4, atol=1e-4)
    attention = cache["decoder"]["layers_0"]["self_attention"]
    np.testing.assert_array_equal(attention["cache_lengths"], lengths + 3)  # added by the ragged prefill
    assert int(attention["cache_index"]) == max(lengths) + 3  # flax's scalar: the high-water mark


def test_position_schemes_differ_and_config_validates():
    outs = {}
    for position in ("sinusoidal", "rope", "alibi", "none"):
        model = Transformer(CFG.replace(position=position))
        v = jinit(model, SRC, TGT)
        outs[position] = np.asarray(japply(model, v, SRC, TGT))
    for a in outs:
        for b in outs:
            if a < b:
                assert not np.allclose(outs[a], outs[b], atol=1e-3), (a, b)
    with pytest.raises(ValueError, match="position"):
        TransformerConfig(position="learned")


@pytest.mark.parametrize("relative", ["rope", "alibi"])
def test_explicit_positions_also_place_the_keys_of_passed_inputs(relative):
    # layer(x, x, positions=p) is self-attention written flax's way: the keys are the
    # same positions. They were placed at arange(S) instead (0.86 / 0.056 off).
    x = _x((B, 6, E), 0)
    p = jnp.array([[3, 4, 5, 6, 7, 8], [0, 2, 4, 6, 8, 10]], jnp.int32)
    m = MultiHeadAttention(num_heads=N, relative_position=relative)
    v = jinit(m, x, seed=1)
    want = japply(m, v, x, positions=p, is_causal=True)
    np.testing.assert_allclose(japply(m, v, x, x, positions=p, is_causal=True), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(japply(m, v, x, x, positions=p, key_positions=p, is_causal=True), want,
                               rtol=1e-5, atol=1e-5)
    # Keys of another length have positions of their own: they must be given.
    with pytest.raises(ValueError, match="key_positions"):
        m.apply(v, x, x[:, :4], positions=p)
    shifted = japply(m, v, x, x, positions=p, key_positions=p + 1, is_causal=True)
    assert not np.allclose(shifted, want, atol=1e-4)
