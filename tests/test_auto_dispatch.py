"""Auto dispatch (``implementation=None``) never changes what works, and sizes the logical call.

Each test failed before its fix: a gradient of a gradient through the
auto-chosen chunked path, auto under ``jax.vmap`` choosing from per-example
shapes, and a wrong-shaped ``scale`` reaching XLA as a broadcasting error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention import chunked_attention, scaled_dot_product_attention as sdpa

from flax_attention.functional import attention


def _qkv(seed=0, batch=(2,), t=5, s=6, n=2, kh=1, h=4):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32)
                 for shape in ((*batch, t, n, h), (*batch, s, kh, h), (*batch, s, kh, h)))


def _uses_chunked(fn, *args):
    return "custom_vjp" in str(jax.make_jaxpr(fn)(*args))


def test_auto_takes_dense_for_a_gradient_of_a_gradient(monkeypatch):
    # The chunked custom_vjp is differentiable once; auto chose it (at T = S >= 512 on
    # CPU, here forced) and reverse-over-reverse failed with JAX's fori_loop error.
    monkeypatch.setattr(attention, "AUTO_CHUNKED_BYTES", 0)
    q, k, v = _qkv(1)
    assert _uses_chunked(lambda q: sdpa(q, k, v), q)  # the probe is live: first order stays chunked

    def second_order(impl):
        inner = jax.grad(lambda q: (sdpa(q, k, v, is_causal=True, implementation=impl) ** 3).sum())
        return jax.grad(lambda q: (inner(q) ** 2).sum())(q)

    np.testing.assert_allclose(second_order(None), second_order("dense"), rtol=1e-4, atol=1e-5)
    jitted = jax.jit(jax.grad(lambda q: (jax.grad(lambda q: (sdpa(q, k, v) ** 3).sum())(q) ** 2).sum()))
    assert np.all(np.isfinite(jitted(q)))
    # Hessian-vector products by reverse-over-reverse (jacrev of grad) too.
    hvp = jax.jacrev(jax.grad(lambda q: (sdpa(q[None], k[:1], v[:1]) ** 2).sum()))(q[0, :2])
    assert hvp.shape == (2, 2, 4) * 2 and np.all(np.isfinite(hvp))


def test_auto_under_vmap_chooses_for_the_batched_call(monkeypatch):
    # Under vmap auto saw per-example shapes: a batch whose logits exceed the threshold
    # got the dense path per example (1248 MiB temp vs 403 MiB batched in the report).
    q, k, v = _qkv(2, batch=(8,), t=16, s=16)
    per_example = 4 * 2 * 16 * 16  # float32 logits bytes of one example (N = 2)
    monkeypatch.setattr(attention, "AUTO_CHUNKED_BYTES", 4 * per_example)  # 8 examples exceed it
    assert _uses_chunked(lambda q, k, v: sdpa(q, k, v), q, k, v)  # batched call: chunked
    assert not _uses_chunked(lambda q, k, v: sdpa(q, k, v), q[:1], k[:1], v[:1])  # one example: dense
    per = lambda q, k, v: sdpa(q[None], k[None], v[None])[0]  # noqa: E731
    for fn in (jax.vmap(per), jax.vmap(jax.jit(per)), jax.jit(jax.vmap(per))):
        assert _uses_chunked(fn, q, k, v)
        np.testing.assert_allclose(fn(q, k, v), sdpa(q, k, v, implementation="dense"), atol=2e-6)
    # Nested vmaps multiply: 2 x 4 examples are the same 8.
    nested = jax.vmap(jax.vmap(per))
    assert _uses_chunked(nested, *(x.reshape(2, 4, *x.shape[1:]) for x in (q, k, v)))


@pytest.mark.parametrize("fn", [sdpa, chunked_attention, lambda q, k, v, scale: attention.attention_weights(
    q, k, scale=scale)], ids=["sdpa", "chunked", "weights"])
def test_wrong_shaped_scale_is_a_clear_value_error(fn):
    q, k, v = _qkv(3)
    for bad in (jnp.ones(2), np.ones((1,)), [0.5, 0.5]):
        with pytest.raises(ValueError, match=r"scale must be a scalar.*got shape"):
            fn(q, k, v, scale=bad)
    fn(q, k, v, scale=jnp.float32(0.5))  # a 0-d array is a scalar
