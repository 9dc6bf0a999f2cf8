"""Shared helpers for the module tests: jitted apply and compile-free parameter init."""

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
