"""Transformer pieces: positional encoding, FFN, layers, stacks, full model, decoding cache."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention import (
    PositionwiseFeedForward,
    SinusoidalPositionalEncoding,
    Transformer,
    TransformerConfig,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
    init_cache,
    key_mask,
    sinusoidal_encoding,
    sinusoidal_positions,
)
from module_helpers import japply, jinit

CFG = TransformerConfig(vocab_size=13, d_model=16, num_heads=4, d_ff=32, num_encoder_layers=1,
                        num_decoder_layers=2, max_len=16)
B, S, T, E = 2, 6, 5, 16
SRC = jnp.array([[3, 4, 5, 6, 7, 8], [9, 10, 11, 0, 0, 0]])  # example 1 has 3 pads
TGT = jnp.array([[1, 5, 6, 7, 2], [1, 9, 10, 12, 4]])  # BOS = 1, no padding



def shapes(m, *args, **kwargs):
    """Output shapes of ``m.init`` then ``m.apply``: traced only, nothing compiled."""
    v = jax.eval_shape(lambda: m.init(jax.random.key(0), *args, **kwargs))
    return v, jax.eval_shape(lambda v_: m.apply(v_, *args, **kwargs), v)


def _x(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ------------------------------------------------------- positional encoding

def test_sinusoidal_hand_values():
    pe = np.asarray(sinusoidal_positions(4, 8))
    assert pe.shape == (4, 8) and pe.dtype == np.float32
    np.testing.assert_array_equal(pe[0, 0::2], 0.0)  # sin(0)
    np.testing.assert_array_equal(pe[0, 1::2], 1.0)  # cos(0)
    # Dims 2 and 3 (i = 1) of E = 8 have frequency 10000^(-2/8) = 1/10.
    np.testing.assert_allclose(pe[3, 2], math.sin(0.3), rtol=1e-6)
    np.testing.assert_allclose(pe[3, 3], math.cos(0.3), rtol=1e-6)
    np.testing.assert_allclose(pe[1, 0], math.sin(1.0), rtol=1e-6)
    # An offset table is a slice of the full one; explicit positions agree too.
    big = np.asarray(sinusoidal_positions(10, 8))
    np.testing.assert_allclose(sinusoidal_positions(3, 8, offset=4), big[4:7], atol=1e-6)
    np.testing.assert_allclose(sinusoidal_encoding(jnp.array([[9, 2]]), 8)[0], big[[9, 2]], atol=1e-6)


def test_positional_encoding_module_shape_and_decode_offset():
    x = _x((B, T, E), 0)
    m = SinusoidalPositionalEncoding()
    out = m.apply({}, x)
    assert out.shape == (B, T, E)
    np.testing.assert_allclose(out - x, jnp.broadcast_to(sinusoidal_positions(T, E), x.shape), atol=1e-6)
    cache = m.init(jax.random.key(0), x, decode=True)["cache"]
    assert cache["position_index"].shape == () and int(cache["position_index"]) == 0
    first, state = m.apply({"cache": cache}, x[:, :3], decode=True, mutable=["cache"])
    second, state = m.apply(state, x[:, 3:], decode=True, mutable=["cache"])
    assert int(state["cache"]["position_index"]) == T
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), out, atol=1e-6)


# ------------------------------------------------------------- feed-forward

def test_ffn_matches_float64_reference():
    x = _x((B, T, E), 0)
    m = PositionwiseFeedForward(d_ff=32)
    v = jinit(m, x)
    out = japply(m, v, x)
    assert out.shape == (B, T, E)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    xs = np.asarray(x, np.float64)
    want = np.maximum(xs @ p["wi"]["kernel"] + p["wi"]["bias"], 0) @ p["wo"]["kernel"] + p["wo"]["bias"]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- layers, stacks

@pytest.mark.parametrize("pre_ln", [False, True])
def test_layer_and_stack_shapes(pre_ln):
    cfg = CFG.replace(pre_ln=pre_ln)
    x, y = _x((B, S, E), 0), _x((B, T, E), 1)
    mask = key_mask(SRC != 0)
    for module, args, kwargs in [
        (TransformerEncoderLayer(cfg), (x, mask), {}),
        (TransformerDecoderLayer(cfg), (y, x), {"cross_mask": mask}),
        (TransformerEncoder(cfg), (x, mask), {}),
        (TransformerDecoder(cfg), (y, x), {"cross_mask": mask}),
    ]:
        v, out = shapes(module, *args, **kwargs)
        assert out.shape == args[0].shape
        if isinstance(module, (TransformerEncoder, TransformerDecoder)):
            assert ("final_norm" in v["params"]) == pre_ln


def test_decoder_is_causal_by_gradient():
    # Pre-LN here, so that both residual layouts run numerically (post-LN: the model fixture).
    y, enc = _x((1, T, E), 0), _x((1, S, E), 1)
    dec = TransformerDecoder(CFG.replace(pre_ln=True, num_decoder_layers=1))
    v = jinit(dec, y, enc)
    # jac[t, e, t2, e2] = d out[t, e] / d y[t2, e2]; nothing may flow from t2 > t.
    jac = jax.jit(jax.jacrev(lambda y_: dec.apply(v, y_, enc)[0]))(y)[:, :, 0]
    influence = np.abs(np.asarray(jac)).sum(axis=(1, 3))  # [T, T2]
    assert np.all(influence[np.triu_indices(T, 1)] == 0.0)
    assert np.all(influence[np.tril_indices(T)] > 0.0)


# -------------------------------------------------------------- Transformer

@pytest.fixture(scope="module")
def fx():
    """One model, its variables and jitted entry points, shared to keep compiles few."""
    model = Transformer(CFG)
    v = jinit(model, SRC, TGT)
    return dict(
        model=model, v=v,
        fwd=jax.jit(lambda v_, src, tgt: model.apply(v_, src, tgt)),
        enc=jax.jit(lambda v_, src: model.apply(v_, src, deterministic=True, method=Transformer.encode)),
        dec=jax.jit(lambda v_, tgt, e, src: model.apply(
            v_, tgt, e, src, deterministic=True, decode=False, method=Transformer.decode)),
    )


@pytest.mark.parametrize("overrides", [{}, {"pre_ln": True, "share_embeddings": False,
                                            "tie_output": False, "output_vocab_size": 7,
                                            "num_kv_heads": 2, "dtype": jnp.bfloat16}])
def test_transformer_shapes(overrides):
    model = Transformer(CFG.replace(**overrides))
    v, logits = shapes(model, SRC, TGT)
    assert logits.shape == (B, T, model.config.target_vocab_size) and logits.dtype == jnp.float32
    encoded = jax.eval_shape(lambda v_: model.apply(v_, SRC, method=Transformer.encode), v)
    assert encoded.shape == (B, S, E)
    assert ("embedding" in v["params"]) == model.config.share_embeddings
    assert ("logits" in v["params"]) != model.config.tie_output


def test_encode_decode_and_call_agree_and_jit_equals_eager(fx):
    eager = fx["model"].apply(fx["v"], SRC, TGT)
    np.testing.assert_allclose(fx["fwd"](fx["v"], SRC, TGT), eager, rtol=1e-5, atol=1e-5)
    encoded = fx["enc"](fx["v"], SRC)
    np.testing.assert_allclose(fx["dec"](fx["v"], TGT, encoded, SRC), eager, rtol=1e-5, atol=1e-5)


def test_source_padding_is_invisible_to_the_decoder(fx):
    encoded = fx["enc"](fx["v"], SRC)
    # Rewrite the encoder states at example 1's padded positions: logits must not move.
    garbage = encoded.at[1, 3:].set(100.0)
    np.testing.assert_allclose(fx["dec"](fx["v"], TGT, garbage, SRC),
                               fx["dec"](fx["v"], TGT, encoded, SRC), rtol=1e-5, atol=1e-5)


def test_dropout_active_and_reproducible(fx):
    model, v = fx["model"], fx["v"]
    run = jax.jit(lambda key: model.apply(v, SRC, TGT, deterministic=False, rngs={"dropout": key}))
    a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    assert not np.allclose(a, fx["fwd"](v, SRC, TGT))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_cached_decoding_equals_teacher_forcing(fx):
    model, v = fx["model"], fx["v"]
    encoded = fx["enc"](v, SRC)
    full = fx["dec"](v, TGT, encoded, SRC)
    cache = init_cache(model, B, max_len=8)
    h = E // CFG.num_heads
    for i in range(CFG.num_decoder_layers):
        layer = cache["decoder"][f"layers_{i}"]["self_attention"]
        assert layer["cached_key"].shape == layer["cached_value"].shape == (B, 8, CFG.num_heads, h)
        assert set(layer) == {"cached_key", "cached_value", "cache_index"}  # flax's layout
        assert layer["cache_index"].shape == () and int(layer["cache_index"]) == 0
    assert set(cache["positions"]) == {"position_index"} and cache["positions"]["position_index"].shape == ()
    assert "encoder" not in cache  # the encoder keeps no cache
    assert "cross_attention" not in cache["decoder"]["layers_0"]  # filled by the first decode call
    step = jax.jit(lambda c, tok: model.apply({"params": v["params"], "cache": c}, tok, encoded, SRC,
                                              decode=True, mutable=["cache"], method=Transformer.decode))
    outs, start = [], 0
    for size in (2, 1, 1, 1):  # prefill two tokens, then one at a time
        logits, state = step(cache, TGT[:, start:start + size])
        cache, start = state["cache"], start + size
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)


def test_attention_weights_are_sown_for_every_layer(fx):
    v = fx["v"]
    sowing = Transformer(CFG.replace(sow_weights=True))
    _, state = japply(sowing, v, SRC, TGT, mutable=["intermediates"])
    leaves = jax.tree_util.tree_leaves_with_path(state["intermediates"])
    assert len(leaves) == CFG.num_encoder_layers + 2 * CFG.num_decoder_layers
    n = CFG.num_heads
    shapes = {jax.tree_util.keystr(p): w.shape for p, w in leaves}
    assert shapes["['encoder']['layers_0']['self_attention']['attention_weights'][0]"] == (B, n, S, S)
    assert shapes["['decoder']['layers_1']['cross_attention']['attention_weights'][0]"] == (B, n, T, S)


def test_config_defaults_and_validation():
    base = TransformerConfig.base(vocab_size=100)
    assert (base.d_model, base.num_heads, base.d_ff, base.num_encoder_layers,
            base.num_decoder_layers, base.dropout_rate, base.pre_ln) == (512, 8, 2048, 6, 6, 0.1, False)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        TransformerConfig(d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="share_embeddings"):
        TransformerConfig(vocab_size=10, output_vocab_size=12)
    with pytest.raises(ValueError, match="max_len"):
        shapes(Transformer(CFG), SRC, jnp.ones((B, 17), jnp.int32))


def test_cross_attention_memory_is_cached_by_the_first_decode_call(fx):
    model, v = fx["model"], fx["v"]
    encoded = fx["enc"](v, SRC)
    full = fx["dec"](v, TGT, encoded, SRC)
    step = jax.jit(lambda c, tok, enc: model.apply({"params": v["params"], "cache": c}, tok, enc, SRC,
                                                   decode=True, mutable=["cache"], method=Transformer.decode))
    logits, state = step(init_cache(model, B, max_len=8), TGT[:, :2], encoded)
    cross = state["cache"]["decoder"]["layers_1"]["cross_attention"]
    assert cross["cached_key"].shape == (B, S, CFG.num_heads, E // CFG.num_heads)
    outs = [logits]
    for t in range(2, T):  # encoded=None: the cached keys/values are reused
        logits, state = step(state["cache"], TGT[:, t:t + 1], None)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="earlier call"):  # nothing cached yet
        step(init_cache(model, B, max_len=8), TGT[:, :1], None)


def test_config_passes_attention_options_to_every_layer(fx):
    import flax.linen as nn

    v = fx["v"]
    base = np.asarray(fx["fwd"](v, SRC, TGT))
    run = lambda **kw: np.asarray(japply(Transformer(CFG.replace(**kw)), v, SRC, TGT))  # noqa: E731
    # flax's function is the same maths; the chunked kernel too.
    np.testing.assert_allclose(run(attention_fn=nn.dot_product_attention), base, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run(attention_implementation="chunked"), base, rtol=1e-4, atol=1e-4)
    # A window of 0 predecessors leaves each self-attention query only itself.
    assert not np.allclose(run(attention_window=0), base, atol=1e-3)
    scaled = run(attention_scale=0.1)
    assert not np.allclose(scaled, base, atol=1e-3)
    np.testing.assert_allclose(run(attention_scale=0.1, attention_fn=nn.dot_product_attention), scaled,
                               rtol=1e-4, atol=1e-4)
    assert CFG.replace(attention_window=[2, 0]).attention_window == (2, 0)  # hashable after JSON


def test_config_rejects_a_bad_attention_implementation_at_construction():
    # It passed TransformerConfig and failed only at the model's first call.
    with pytest.raises(ValueError, match=r"TransformerConfig: attention_implementation.*'chunkd'"):
        TransformerConfig(attention_implementation="chunkd")
    with pytest.raises(ValueError, match="attention_scale must be a number"):
        TransformerConfig(attention_scale=(0.5, 0.5))
    for name in (None, "dense", "chunked", "pallas_tpu:interpret"):
        TransformerConfig(attention_implementation=name)
