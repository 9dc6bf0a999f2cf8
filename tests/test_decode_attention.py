"""The dense path's small-query-block (decode) form: same results as the dot form, no cache copies."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention import padding_mask, scaled_dot_product_attention
from flax_attention.functional import attention

CPU = jax.default_backend() == "cpu"


def _inputs(t, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, 3, t, 4, 6))  # [B1, B2, T, N=4, H=6]: two batch dims, GQA G=2
    k = rng.normal(size=(2, 3, 7, 2, 6))  # [B1, B2, S=7, K=2, H]
    v = rng.normal(size=(2, 3, 7, 2, 5))  # value head dim D=5 != H
    lengths = np.array([[7, 0, 3], [1, 5, 0]])  # length 0: a fully masked (dead) row
    mask = padding_mask(jnp.asarray(lengths), 7)[..., None, None, :]
    return [jnp.asarray(x, dtype) for x in (q, k, v)] + [mask]


@pytest.mark.skipif(not CPU, reason="the small-query-block form is taken on CPU only")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("t", [1, 2])
def test_small_query_form_matches_dot_form(t, dtype, monkeypatch):
    q, k, v, mask = _inputs(t, dtype)

    def run(q, k, v):
        out, w = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=True, return_weights=True)
        grads = jax.grad(lambda *a: scaled_dot_product_attention(*a, mask=mask).astype(jnp.float32).sum(),
                         argnums=(0, 1, 2))(q, k, v)
        return out, w, grads

    assert attention._few_query_rows(t, 2)
    few = jax.jit(run)(q, k, v)
    monkeypatch.setattr(attention, "FEW_QUERY_ROWS", 0)  # every call takes the dot form
    dot = jax.jit(run)(q, k, v)
    assert few[0].dtype == dtype and few[1].dtype == jnp.float32
    assert not np.any(np.asarray(few[0][0, 1], np.float32)) and not np.any(np.asarray(few[1][1, 2]))  # dead rows
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(jax.tree.leaves(few), jax.tree.leaves(dot)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.skipif(not CPU, reason="XLA:CPU's dot layout rule is what this guards against")
def test_decode_step_reads_the_cache_layout_in_place():
    # A [B, S, K, H] cache and one query token: XLA:CPU used to copy K and V into [B, K, H, S] /
    # [B, K, S, D] before the dots; no transpose or copy the size of the cache may remain.
    b, s, n, kv, h = 2, 64, 4, 2, 8
    q = jnp.zeros((b, 1, n, h))
    cache = jnp.zeros((b, s, kv, h))
    mask = jnp.ones((b, 1, 1, s), bool)
    text = jax.jit(lambda q, k, v: scaled_dot_product_attention(q, k, v, mask=mask)).lower(
        q, cache, cache).compile().as_text()
    sizes = [int(np.prod([int(d) for d in shape.split(",") if d]))
             for shape in re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} (?:transpose|copy)\(", text)]
    assert b * s * kv * h not in sizes, text
