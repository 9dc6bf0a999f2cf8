"""Transformer IMDB classifier: shapes, padding invariance, BiGRU-compatible interface."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention.models.classifier import TransformerClassifier, TransformerClassifierConfig, concat_pool


def small(pooling, **kw):
    return TransformerClassifierConfig(vocab_size=50, d_model=16, num_heads=2, d_ff=32, num_layers=2,
                                       max_len=32, pooling=pooling, attention_size=8, **kw)


@pytest.mark.parametrize("pooling", ["mean", "attention", "cls", "concat"])
def test_shapes_weights_and_padding_invariance(pooling):
    model = TransformerClassifier(small(pooling))
    rng = np.random.default_rng(0)
    lengths = jnp.asarray([5, 3, 8], jnp.int32)
    tokens = rng.integers(3, 50, size=(3, 8)).astype(np.int32)
    tokens[np.arange(8) >= np.asarray(lengths)[:, None]] = 0
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens, lengths)["params"]
    apply = jax.jit(model.apply)
    logits, weights = apply({"params": params}, tokens, lengths)
    assert logits.shape == (3,) and weights.shape == (3, 8) and logits.dtype == jnp.float32

    # Longer padding, and garbage (non-zero ids) in the padded slots: same logits.
    longer = np.concatenate([tokens, np.zeros((3, 6), np.int32)], axis=1)
    garbage = np.where(np.arange(14) >= np.asarray(lengths)[:, None], 7, longer).astype(np.int32)
    for variant in (longer, garbage):
        logits2, weights2 = apply({"params": params}, variant, lengths)
        np.testing.assert_allclose(logits2, logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(weights2[:, :8], weights, rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(weights2)[:, 8:] == 0)

    if pooling != "cls":  # pooling weights: a distribution over the real tokens
        np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-5)
        assert np.all(np.asarray(weights)[np.arange(8) >= np.asarray(lengths)[:, None]] == 0)


def test_concat_pool_by_hand():
    # Two rows of states [S=3, E=2]; row 0 has 2 real tokens, row 1 none.
    h = jnp.asarray([[[1.0, -4.0], [3.0, -2.0], [100.0, 100.0]],
                     [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]], jnp.float32)
    lengths = jnp.asarray([2, 0], jnp.int32)
    pooled, weights = concat_pool(h, lengths)
    # [last real state, max over real, mean over real]; padding (100s) never enters.
    np.testing.assert_array_equal(pooled[0], [3.0, -2.0, 3.0, -2.0, 2.0, -3.0])
    np.testing.assert_array_equal(pooled[1], np.zeros(6))  # nothing to pool: zeros, not -inf
    np.testing.assert_array_equal(weights, [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    grad = jax.grad(lambda x: concat_pool(x, lengths)[0].sum())(h)
    # d/dh: last (1) + max (1, both features at token 1) + mean (1/2 each real token).
    np.testing.assert_array_equal(grad[0], [[0.5, 0.5], [2.5, 2.5], [0.0, 0.0]])
    np.testing.assert_array_equal(grad[1], np.zeros((3, 2)))


def test_dropout_only_in_training():
    model = TransformerClassifier(small("mean", dropout_rate=0.5))
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, 50, size=(2, 6)), jnp.int32)
    lengths = jnp.asarray([6, 4], jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens, lengths)["params"]
    apply = jax.jit(model.apply, static_argnames="train")
    eval_a = apply({"params": params}, tokens, lengths)[0]
    eval_b = apply({"params": params}, tokens, lengths, train=False)[0]
    train_out = apply({"params": params}, tokens, lengths, train=True, rngs={"dropout": jax.random.PRNGKey(1)})[0]
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train_out, eval_a)


def test_bad_config_and_too_long_input():
    with pytest.raises(ValueError, match="pooling"):
        TransformerClassifierConfig(pooling="max")
    with pytest.raises(ValueError, match="lm_dropout_rate"):
        TransformerClassifierConfig(lm_dropout_rate=1.0)
    with pytest.raises(ValueError, match="lm_lr_decay=0.5 must be >= 1"):
        TransformerClassifierConfig(lm_lr_decay=0.5)
    with pytest.raises(ValueError, match="divisible"):
        TransformerClassifierConfig(d_model=30, num_heads=4)
    model = TransformerClassifier(small("cls"))
    with pytest.raises(ValueError, match="max_len"):
        model.init(jax.random.PRNGKey(0), jnp.ones((1, 32), jnp.int32), jnp.ones((1,), jnp.int32))
