"""flax_attention.nnx.Transformer: the linen Transformer's parameters, logits, cached decoding and
translations; a train.py checkpoint loads into it; it trains under nnx.jit with nnx.Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import flax_attention as fa
import flax_attention.nnx as fnnx
from module_helpers import jinit

SRC = jnp.array([[3, 4, 5, 0], [6, 7, 8, 9]])  # 0 = pad
TGT = jnp.array([[1, 4, 5, 6, 0], [1, 7, 3, 4, 5]])  # BOS = 1

CONFIGS = {
    "post_ln_sinusoidal": dict(),
    "pre_ln_untied_rope_gqa": dict(pre_ln=True, share_embeddings=False, tie_output=False,
                                   output_vocab_size=21, position="rope", num_heads=4, num_kv_heads=2),
    "alibi_window": dict(position="alibi", attention_window=2),
}


def _config(**kw):
    base = dict(vocab_size=20, d_model=8, num_heads=2, d_ff=16, num_encoder_layers=1,
                num_decoder_layers=2, max_len=10)
    return fa.TransformerConfig(**{**base, **kw})


def _loaded(config, seed=1):
    linen = fa.Transformer(config)
    variables = jinit(linen, SRC, TGT, seed=seed)
    return linen, variables, fnnx.load_linen_variables(fnnx.Transformer(config, rngs=nnx.Rngs(0)), variables)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_linen_parameters_give_identical_logits_both_ways(name):
    config = _config(**CONFIGS[name])
    linen, variables, model = _loaded(config)
    ours = set(traverse_util.flatten_dict(fnnx.linen_variables(model)["params"]))
    assert ours == set(traverse_util.flatten_dict(variables["params"]))
    logits, linen_logits = nnx.jit(lambda m: m(SRC, TGT)), jax.jit(linen.apply)  # one compile each
    np.testing.assert_allclose(logits(model), linen_logits(variables, SRC, TGT), rtol=1e-6, atol=1e-6)
    # NNX -> linen: freshly initialised NNX parameters drive the linen model identically.
    fresh = fnnx.Transformer(config, rngs=nnx.Rngs(5))
    np.testing.assert_allclose(linen_logits(fnnx.linen_variables(fresh), SRC, TGT), logits(fresh),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["post_ln_sinusoidal", "alibi_window"])
def test_cached_decoding_equals_teacher_forcing(name):
    _, _, model = _loaded(_config(**CONFIGS[name]))
    model.init_cache(2, 6)

    @nnx.jit
    def run(m):
        encoded = m.encode(SRC)
        steps = [m.decode(TGT[:, :2], encoded, SRC, decode=True)]  # prefill, then one token a call
        steps += [m.decode(TGT[:, i:i + 1], None, SRC, decode=True) for i in range(2, 4)]
        return jnp.concatenate(steps, axis=1), m.decode(TGT[:, :4], encoded, SRC)

    got, want = run(model)  # TGT[:, :4] holds no padding, so teacher forcing masks nothing more
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ragged_prefill_then_step_matches_linen():
    linen, variables, model = _loaded(_config())
    prompt, lengths = jnp.array([[1, 4, 5], [1, 7, 0]]), jnp.array([3, 2])  # right-padded prompts
    nxt = jnp.array([[6], [3]])
    model.init_cache(2, 6)

    @nnx.jit
    def run(m):
        encoded = m.encode(SRC)
        m.decode(prompt, encoded, SRC, decode=True, lengths=lengths)
        return m.decode(nxt, None, SRC, decode=True)

    got = run(model)
    assert model.positions.position_index[...].shape == ()
    np.testing.assert_array_equal(model.positions.position_lengths[...], lengths + 1)

    @jax.jit
    def linen_run(params):
        encoded = linen.apply({"params": params}, SRC, method=linen.encode)
        cache = fa.init_cache(linen, 2, 6)
        decode = lambda c, t, e, **kw: linen.apply(  # noqa: E731
            {"params": params, "cache": c}, t, e, SRC, decode=True, mutable=["cache"],
            method=linen.decode, **kw)
        _, state = decode(cache, prompt, encoded, lengths=lengths)
        return decode(state["cache"], nxt, None)[0]

    np.testing.assert_allclose(got, linen_run(variables["params"]), rtol=1e-6, atol=1e-6)


def test_greedy_and_beam_search_match_linen():
    linen, variables, model = _loaded(_config(**CONFIGS["pre_ln_untied_rope_gqa"]))
    np.testing.assert_array_equal(fnnx.greedy_decode(model, SRC, max_len=6),
                                  fa.greedy_decode(linen, variables["params"], SRC, max_len=6))
    got = fnnx.beam_search(model, SRC, beam_size=2, max_len=5, alpha=0.6)
    want = fa.beam_search(linen, variables["params"], SRC, beam_size=2, max_len=5, alpha=0.6)
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.slow
def test_trains_under_jit_with_dropout_and_optimizer():
    import optax

    config = _config(dropout_rate=0.1, attention_dropout_rate=0.1, num_decoder_layers=1)
    model = fnnx.Transformer(config, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    tgt_out = jnp.concatenate([TGT[:, 1:], jnp.full((2, 1), 2)], axis=1)

    @nnx.jit
    def step(m, opt):
        def loss_fn(m):
            logits = m(SRC, TGT, deterministic=False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, tgt_out).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_train_py_checkpoint_loads_with_identical_logits_and_translations(tmp_path):
    import train
    from flax_attention.training.inspector import load_for_inference
    from test_seq2seq import TINY

    assert train.main(TINY + ["--workdir", str(tmp_path)]) == 0
    _, _, linen, params, _, _ = load_for_inference(tmp_path)
    model = fnnx.load_linen_variables(fnnx.Transformer(linen.config, rngs=nnx.Rngs(0)), {"params": params})
    src = jnp.array([[3, 4, 5], [5, 3, 0]])
    tgt = jnp.array([[1, 5, 4, 3], [1, 3, 5, 2]])
    np.testing.assert_allclose(nnx.jit(lambda m: m(src, tgt))(model),
                               jax.jit(linen.apply)({"params": params}, src, tgt), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(fnnx.greedy_decode(model, src, max_len=5),
                                  fa.greedy_decode(linen, params, src, max_len=5))
