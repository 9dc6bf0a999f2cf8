"""BiGRU + attention classifier: NumPy float64 GRU reference, length handling, masking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention.models.bigru import (
    BiGRU,
    BiGRUClassifier,
    BiGRUConfig,
    bidirectional_gru,
    flip_prefix,
    gru_recurrence,
    reverse_index,
)

E, U = 3, 4


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_gru(x, w_ih, b_ih, w_hh, b_hh):
    """float64 GRU over x [T, E] with PyTorch's equations (gates r, z, n)."""
    h = np.zeros(w_hh.shape[0])
    out = []
    for xt in x:
        gi, gh = xt @ w_ih + b_ih, h @ w_hh + b_hh
        r = _sigmoid(gi[:U] + gh[:U])
        z = _sigmoid(gi[U:2 * U] + gh[U:2 * U])
        n = np.tanh(gi[2 * U:] + r * gh[2 * U:])
        h = (1 - z) * n + z * h
        out.append(h)
    return np.stack(out)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(2, E, 3 * U)) * 0.5, rng.normal(size=(2, 3 * U)) * 0.1,
            rng.normal(size=(2, U, 3 * U)) * 0.5, rng.normal(size=(2, 3 * U)) * 0.1)


def test_gru_recurrence_matches_numpy():
    w_ih, b_ih, w_hh, b_hh = _params()
    x = np.random.default_rng(1).normal(size=(6, E))
    proj = (x @ w_ih[0] + b_ih[0])[:, None, :]  # [T, B=1, 3U]
    got = gru_recurrence(jnp.asarray(proj, jnp.float32), jnp.asarray(w_hh[0], jnp.float32),
                         jnp.asarray(b_hh[0], jnp.float32), jnp.zeros((1, U)))
    np.testing.assert_allclose(np.asarray(got)[:, 0], np_gru(x, w_ih[0], b_ih[0], w_hh[0], b_hh[0]), atol=1e-5)


def test_reverse_index_is_an_involution_on_real_prefix():
    idx = np.asarray(reverse_index(jnp.array([3, 5, 1]), 5))
    np.testing.assert_array_equal(idx, [[2, 1, 0, 3, 4], [4, 3, 2, 1, 0], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(np.take_along_axis(idx, idx, axis=1), np.tile(np.arange(5), (3, 1)))


def test_flip_prefix_gradient_is_the_autodiff_gradient():
    lengths = jnp.array([3, 5, 1])
    rev = reverse_index(lengths, 5)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 2)), jnp.float32)
    ct = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 2)), jnp.float32)
    ours = jax.grad(lambda x: jnp.sum(ct * flip_prefix(x, rev)))(x)
    plain = jax.grad(lambda x: jnp.sum(ct * jnp.take_along_axis(x, rev[:, :, None], axis=1)))(x)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(plain))
    np.testing.assert_array_equal(np.asarray(flip_prefix(x, rev))[0, :3], np.asarray(x)[0, 2::-1])


@pytest.mark.parametrize("unroll", [1, 3])
def test_bidirectional_gru_matches_numpy_per_length(unroll):
    w_ih, b_ih, w_hh, b_hh = _params()
    lengths = np.array([5, 2, 7])
    x = np.random.default_rng(2).normal(size=(3, 7, E))
    out = np.asarray(bidirectional_gru(jnp.asarray(x, jnp.float32), jnp.asarray(lengths, jnp.int32),
                                       *(jnp.asarray(p, jnp.float32) for p in (w_ih, b_ih, w_hh, b_hh)),
                                       unroll=unroll))
    assert out.shape == (3, 7, 2 * U)
    for b, n in enumerate(lengths):
        fwd = np_gru(x[b, :n], w_ih[0], b_ih[0], w_hh[0], b_hh[0])
        bwd = np_gru(x[b, :n][::-1], w_ih[1], b_ih[1], w_hh[1], b_hh[1])[::-1]  # starts at the last real token
        np.testing.assert_allclose(out[b, :n, :U], fwd, atol=1e-5)
        np.testing.assert_allclose(out[b, :n, U:], bwd, atol=1e-5)
        assert (out[b, n:] == 0).all()


def _model(**kw):
    cfg = BiGRUConfig(vocab_size=30, embed_dim=6, hidden_size=5, attention_size=4, **kw)
    return BiGRUClassifier(cfg)


def test_classifier_shapes_and_zero_attention_on_padding():
    model = _model()
    tokens = jnp.array([[1, 5, 7, 0, 0, 0], [1, 9, 9, 9, 9, 4]], jnp.int32)
    lengths = jnp.array([3, 6], jnp.int32)
    params = model.init(jax.random.PRNGKey(0), tokens, lengths)
    logits, weights = model.apply(params, tokens, lengths)
    assert logits.shape == (2,) and weights.shape == (2, 6)
    assert (np.asarray(weights)[0, 3:] == 0).all() and (np.asarray(weights)[0, :3] > 0).all()
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
    jit_logits, _ = jax.jit(model.apply)(params, tokens, lengths)
    np.testing.assert_allclose(jit_logits, logits, rtol=1e-5, atol=1e-6)


def test_outputs_unchanged_by_extra_padding_or_garbage_in_padding():
    model = _model()
    tokens = jnp.array([[1, 5, 7, 3, 0], [1, 2, 0, 0, 0]], jnp.int32)
    lengths = jnp.array([4, 2], jnp.int32)
    params = model.init(jax.random.PRNGKey(1), tokens, lengths)
    logits, weights = model.apply(params, tokens, lengths)
    longer = jnp.pad(tokens, ((0, 0), (0, 6)))
    logits2, weights2 = model.apply(params, longer, lengths)
    garbage = jnp.where(jnp.arange(11) >= lengths[:, None], 17, longer)  # non-pad ids beyond the length
    logits3, weights3 = model.apply(params, garbage, lengths)
    for lg, w in ((logits2, weights2), (logits3, weights3)):
        np.testing.assert_allclose(lg, logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(w[:, :5], weights, rtol=1e-5, atol=1e-7)
        assert (np.asarray(w)[:, 5:] == 0).all()


def test_dropout_only_in_training():
    model = _model(dropout_rate=0.5)
    tokens = jnp.ones((4, 5), jnp.int32)
    lengths = jnp.full((4,), 5, jnp.int32)
    params = model.init(jax.random.PRNGKey(0), tokens, lengths)
    a, _ = model.apply(params, tokens, lengths, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    b, _ = model.apply(params, tokens, lengths, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    c, _ = model.apply(params, tokens, lengths)
    d, _ = model.apply(params, tokens, lengths)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(c, d)


def test_config_validation():
    with pytest.raises(ValueError, match="dropout_rate"):
        BiGRUConfig(dropout_rate=1.0)
    with pytest.raises(ValueError, match="hidden_size"):
        BiGRUConfig(hidden_size=0)


@pytest.mark.parametrize("unroll", [1, 2])
def test_fused_vjp_matches_autodiff_of_plain_scan(unroll):
    """The hand-written backward (one dW_hh matmul after the scan) == jax.grad of the plain scan."""
    rng = np.random.default_rng(3)
    t, b = 7, 3
    x_proj, w_hh, b_hh, h0, d_out = (jnp.asarray(a, jnp.float32) for a in (
        rng.normal(size=(t, 2, b, 3 * U)), rng.normal(size=(2, U, 3 * U)) * 0.5,
        rng.normal(size=(2, 3 * U)) * 0.1, rng.normal(size=(2, b, U)), rng.normal(size=(t, 2, b, U))))

    def loss(fused, *args):
        return jnp.sum(d_out * gru_recurrence(*args, unroll=unroll, fused_vjp=fused))

    args = (x_proj, w_hh, b_hh, h0)
    ref = jax.grad(lambda *a: loss(False, *a), argnums=(0, 1, 2, 3))(*args)
    got = jax.jit(jax.grad(lambda *a: loss(True, *a), argnums=(0, 1, 2, 3)))(*args)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gru_recurrence(*args, fused_vjp=True), gru_recurrence(*args, fused_vjp=False),
                               rtol=1e-6, atol=1e-6)


def test_fused_vjp_bigru_layer_gradients_match_autodiff():
    """BiGRU-layer parameter and input gradients (with padding) agree between the two backward passes."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 6, E)), jnp.float32)
    lengths = jnp.array([4, 6, 1], jnp.int32)
    params = BiGRU(U).init(jax.random.PRNGKey(0), x, lengths)

    def loss(p, inputs, fused):
        return jnp.sum(jnp.sin(BiGRU(U, fused_vjp=fused).apply(p, inputs, lengths)))

    ref = jax.grad(loss, argnums=(0, 1))(params, x, False)
    got = jax.grad(loss, argnums=(0, 1))(params, x, True)
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bench_gru_quick_smoke(tmp_path):
    """benchmarks/bench_gru.py runs end to end on tiny shapes and writes its table."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    variants = "jax-autodiff-u1,jax-fusedvjp-u2,torch-packed"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_gru", "--quick", "--rounds", "1",
                           "--variants", variants, "--out", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "gru.md").read_text()
    assert "| variant | ms/step |" in table and " cores usable, ISA: " in table  # names the CPU
    expected = variants.split(",")
    try:
        import torch  # noqa: F401
    except ImportError:  # optional dependency: the bench skips PyTorch without it
        expected.remove("torch-packed")
    for name in expected:
        assert f"| {name} |" in table
