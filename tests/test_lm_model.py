"""Decoder-only LM (linen and NNX): shapes, causality and packed documents via jax.grad, twins, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_attention.linen.partitioning import logical_axis_annotations
from flax_attention.models.lm import LanguageModel, LMConfig, init_cache
from flax_attention.nnx import linen_variables, load_linen_variables
from flax_attention.nnx.lm import LanguageModel as NNXLanguageModel
from module_helpers import jinit

V, T = 23, 8
TINY = dict(vocab_size=V, max_length=16, d_model=16, num_heads=4, num_kv_heads=2, num_layers=2, d_ff=32,
            dropout_rate=0.0)


def tiny(**overrides):
    model = LanguageModel(LMConfig(**{**TINY, **overrides}))
    return model, jinit(model, jnp.zeros((2, T), jnp.int32), seed=1)


def tokens(seed=0, shape=(2, T)):
    return jnp.asarray(np.random.default_rng(seed).integers(3, V, size=shape), jnp.int32)


def perturbed(model, variables, toks, delta, **kw):
    """Logits with ``delta [B, T, E]`` added to the embedded tokens (so ``jax.grad`` can reach them)."""
    def add_delta(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
            out = out + delta
        return out

    with nn.intercept_methods(add_delta):
        return model.apply(variables, toks, **kw)


def test_shapes_parameter_tree_and_partitioning():
    model, variables = tiny()
    logits, h = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, method=model.hidden)))(
        variables, tokens())
    assert logits.shape == (2, T, V) and logits.dtype == jnp.float32
    assert h.shape == (2, T, 16)
    p = variables["params"]
    assert set(p) == {"embedding", "layers_0", "layers_1", "final_norm"}
    assert set(p["layers_0"]) == {"self_attention_norm", "self_attention", "ffn_norm", "ffn"}
    assert p["layers_0"]["self_attention"]["key"]["kernel"].shape == (16, 2, 4)  # GQA: K = 2 kv heads
    assert set(p["final_norm"]) == {"scale"}                                   # RMSNorm
    with logical_axis_annotations():
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens()))["params"]
    assert boxed["embedding"]["embedding"].names == ("vocab", "embed")
    assert boxed["layers_1"]["ffn"]["wi"]["kernel"].names == ("embed", "mlp")
    assert boxed["layers_1"]["self_attention"]["query"]["kernel"].names == ("embed", "heads", "kv")
    cache = init_cache(model, 3, 12)["layers_1"]["self_attention"]
    assert cache["cached_key"].shape == (3, 12, 2, 4) and int(cache["cache_index"]) == 0


@pytest.mark.parametrize("window", [0, 3])
def test_causality_via_grad(window):
    """The logits at t depend on no token after t (and, with a window w, none before t - w per layer)."""
    model, variables = tiny(window=window)
    toks = tokens(1)

    @jax.jit
    def influence(t):
        g = jax.grad(lambda d: perturbed(model, variables, toks, d)[:, t].sum())(jnp.zeros((2, T, 16)))
        return jnp.abs(g).sum(axis=(0, 2))  # [T]: how much each input position moves logits[t]

    for t in range(T):
        got = np.asarray(influence(t))
        lo = max(0, t - window * model.config.num_layers) if window else 0  # receptive field: w per layer
        assert np.all(got[t + 1:] == 0) and np.all(got[:lo] == 0), (t, got)
        assert np.all(got[lo:t + 1] > 0), (t, got)


def test_packed_documents_are_independent():
    """Gradient of one document's loss w.r.t. another's embeddings is exactly zero; restarting positions
    make each document's logits those of its own unpacked forward."""
    model, variables = tiny()
    toks = tokens(2, (1, T))
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]])

    @jax.jit
    def doc_grads(delta):
        def loss(d, doc):
            logp = jax.nn.log_softmax(perturbed(model, variables, toks, d, positions=pos, segment_ids=seg))
            nll = -jnp.take_along_axis(logp[:, :-1], toks[:, 1:, None], axis=-1)[..., 0]
            return jnp.sum(nll * ((seg[:, :-1] == doc) & (seg[:, 1:] == doc)))
        return [jnp.abs(jax.grad(loss)(delta, doc)).sum(axis=(0, 2)) for doc in (1, 2)]

    g1, g2 = (np.asarray(g) for g in doc_grads(jnp.zeros((1, T, 16))))
    assert np.all(g1[3:] == 0) and np.all(g1[:2] > 0)          # doc 1's loss never sees doc 2 or padding
    assert np.all(g2[:3] == 0) and g2[7] == 0 and np.all(g2[3:6] > 0)

    packed = jax.jit(model.apply)(variables, toks, positions=pos, segment_ids=seg)
    # Unpacked: document 1 (right-padded, harmless under causality) and document 2 as their own rows.
    alone = jax.jit(model.apply)(variables, jnp.stack([jnp.pad(toks[0, :3], (0, 1)), toks[0, 3:7]]))
    np.testing.assert_allclose(packed[0, :3], alone[0, :3], atol=1e-5)
    np.testing.assert_allclose(packed[0, 3:7], alone[1], atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, dict(norm="layer", tie_embeddings=False, use_bias=True, window=3,
                                                num_kv_heads=0, relative_position="alibi", num_layers=1)])
def test_linen_equals_nnx(overrides):
    model, variables = tiny(**overrides)
    # Built abstractly (running its initialisers eagerly costs seconds), then given the linen weights.
    twin = nnx.eval_shape(lambda: NNXLanguageModel(model.config, rngs=nnx.Rngs(0)))
    load_linen_variables(twin, variables)
    toks = tokens(3)
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0]])
    pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 0]])
    lengths = jnp.array([5, 3])

    @jax.jit
    def linen(variables):  # packed forward, hidden states, a ragged prefill and one cached step
        out = [model.apply(variables, toks, positions=pos, segment_ids=seg),
               model.apply(variables, toks, method=model.hidden),
               model.apply(variables, toks, logits_at=jnp.array([7, 2]))]
        cache = {**variables, "cache": init_cache(model, 2, 12)}
        for step, kw in ((toks[:, :5], dict(lengths=lengths)), (toks[:, 5:6], {})):
            logits, mutated = model.apply(cache, step, decode=True, mutable=["cache"], **kw)
            cache = {**variables, **mutated}
            out.append(logits)
        return out, cache["cache"]

    @nnx.jit
    def twin_run(twin):
        out = [twin(toks, positions=pos, segment_ids=seg), twin.hidden(toks), twin(toks, logits_at=jnp.array([7, 2]))]
        twin.init_cache(2, 12)
        out.append(twin(toks[:, :5], decode=True, lengths=lengths))
        out.append(twin(toks[:, 5:6], decode=True))
        return out

    want, cache = linen(variables)
    got = twin_run(twin)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), linen_variables(twin)["cache"], cache)


def test_logits_at_is_that_row_of_the_full_logits():
    model, variables = tiny()
    toks = tokens(4)
    full = model.apply(variables, toks)
    at = jnp.array([7, 0])
    got = jax.jit(lambda v, a: model.apply(v, toks, logits_at=a))(variables, at)
    assert got.shape == (2, 1, V) and got.dtype == jnp.float32
    np.testing.assert_allclose(got[:, 0], full[jnp.arange(2), at], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"logits_at must be in \[0, T=8\), got \[8, 0\]"):
        model.apply(variables, toks, logits_at=jnp.array([8, 0]))
    with pytest.raises(ValueError, match=r"logits_at must be int \[B=2\]"):
        model.apply(variables, toks, logits_at=jnp.array([1, 2, 3]))


def test_bad_inputs_and_config():
    model, variables = tiny()
    with pytest.raises(ValueError, match=r"id 23 outside the vocabulary \[0, 23\)"):
        model.apply(variables, jnp.array([[1, 23]]))
    with pytest.raises(ValueError, match=r"id -1 outside the vocabulary"):
        model.apply(variables, jnp.array([[-1, 2]]))
    with pytest.raises(ValueError, match="T=17 exceeds max_length=16; truncate"):
        model.apply(variables, jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="integer array"):
        model.apply(variables, jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="decode=True reads positions from the cache"):
        model.apply({**variables, "cache": init_cache(model, 1, 8)}, jnp.zeros((1, 2), jnp.int32),
                    positions=jnp.zeros((1, 2), jnp.int32), decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match=r"segment_ids \(1, 3\) must have the tokens' shape \(1, 2\)"):
        model.apply(variables, jnp.zeros((1, 2), jnp.int32), segment_ids=jnp.ones((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="max_length \\(20\\) in \\[1, LMConfig.max_length=16\\]"):
        init_cache(model, 1, 20)
    # Under jit ids cannot raise: an out-of-vocabulary id makes its row NaN, never a silent clamp.
    bad = jax.jit(model.apply)(variables, jnp.array([[3, 4, 99, 5], [3, 4, 5, 6]]))
    assert np.all(np.isnan(bad[0])) and np.all(np.isfinite(bad[1]))
    for kw, match in [(dict(norm="batch"), "norm='batch'"), (dict(num_kv_heads=3), "num_kv_heads=3"),
                      (dict(d_model=12, num_heads=4), "even head dim"), (dict(window=-1), "window=-1"),
                      (dict(eos_id=40), "eos_id=40"), (dict(dtype="float33"), "dtype='float33'"),
                      (dict(dropout_rate=1.0), "dropout_rate=1.0")]:
        with pytest.raises(ValueError, match=match):
            LMConfig(**{**TINY, **kw})
