"""Shared test helpers: jitted apply, compile-free parameter init, the float64 attention reference."""

import jax
import jax.numpy as jnp
import numpy as np


def japply(m, variables, *args, **kwargs):
    """``m.apply`` under jit: one compile instead of dozens of eager op compiles."""
    return jax.jit(lambda v, *a: m.apply(v, *a, **kwargs))(variables, *args)


def jinit(m, *args, seed=0, **kwargs):
    """Variables of ``m`` without compiling its initialisers (the slowest part of these tests).

    Shapes come from tracing ``m.init``; parameters are drawn with NumPy (std
    ``1/sqrt(fan_in)``, LayerNorm scales near 1); other collections (the
    decoding cache) are zeros, which is what ``init`` allocates (asserted in
    test_multihead.py::test_cache_errors).
    """
    shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), *args, **kwargs))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if jax.tree_util.keystr(path[:1]) != "['params']":
            return jnp.zeros(s.shape, s.dtype)
        if jax.tree_util.keystr(path[-1:]) == "['scale']":
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), s.dtype)
        std = 1.0 / np.sqrt(s.shape[0]) if len(s.shape) > 1 else 0.1
        return jnp.asarray(std * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def np_sdpa(q, k, v, mask=None, bias=None, scale=None):
    """Float64 reference. q [..., T, N, H], k [..., S, K, H], v [..., S, K, D]; mask/bias [..., N, T, S].

    Written independently of the library: kv heads are repeated (query head n
    reads kv head n // G) and a fully masked row is defined as zeros.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[-2] // k.shape[-2]
    k, v = np.repeat(k, g, axis=-2), np.repeat(v, g, axis=-2)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    logits = np.einsum("...tnh,...snh->...nts", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    keep = np.isfinite(logits)
    if mask is not None:
        keep = keep & np.asarray(mask)
    keep = np.broadcast_to(keep, logits.shape)
    logits = np.where(keep, logits, -np.inf)
    row_max = np.max(logits, axis=-1, keepdims=True)
    e = np.where(keep, np.exp(logits - np.where(np.isfinite(row_max), row_max, 0)), 0.0)
    denom = e.sum(-1, keepdims=True)
    w = e / np.where(denom > 0, denom, 1.0)
    return np.einsum("...nts,...snd->...tnd", w, v), w
