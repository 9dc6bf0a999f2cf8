"""Dtype rules shared by every attention path: the softmax dtype and the finite fill for masked logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import dtypes


def compute_dtype(dtype) -> np.dtype:
    """Logits/softmax dtype: at least float32 and at least the input precision.

    bfloat16/float16 -> float32, float32 -> float32, float64 -> float64 (when
    64-bit mode is on; otherwise no float64 array exists).
    """
    return dtypes.canonicalize_dtype(jnp.promote_types(jnp.float32, dtype))


def mask_fill(dtype) -> float:
    """Finite stand-in for ``-inf`` in masked logits, so no infinity is ever created."""
    return float(jnp.finfo(dtype).min)


def not_neg_inf(x):
    """``x != -inf`` without staging a ``-inf`` constant (which ``jax.debug_infs`` flags).

    NaN counts as "not -inf", so it propagates rather than being masked away.
    """
    # lax, not jnp: jnp's dtype promotion binds a convert op on x, whose output
    # (x itself, -inf included) jax.debug_infs would flag.
    return jax.lax.bitwise_not(jax.lax.lt(x, jax.lax.full_like(x, mask_fill(x.dtype))))
