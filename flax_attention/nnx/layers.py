"""Transformer feed-forward block, Flax NNX: the twin of :class:`flax_attention.PositionwiseFeedForward`."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

Array = jax.Array


class PositionwiseFeedForward(nnx.Module):
    """``FFN(x) = act(x W1 + b1) W2 + b2`` applied to each position (Vaswani et al. 2017, Eq. 2).

    Sub-modules ``wi`` and ``wo`` (:class:`~flax.nnx.Linear`) carry the linen
    module's names, so :mod:`flax_attention.nnx.convert` moves parameters both ways.

    Args:
      in_features: ``E``. d_ff: hidden size ``F``.
      out_features: output size; ``None`` = ``E``.
      activation: default ReLU (the paper's ``max(0, ·)``).
      dropout_rate: dropout on the hidden activations.
      dtype, param_dtype, kernel_init: as :class:`~flax.nnx.Linear`.
      deterministic: disables dropout; the call argument takes precedence (flax NNX's rule).
      rngs: parameter keys; with ``keep_rngs`` (default) and dropout, also the dropout stream.
      keep_rngs: keep a dropout stream in the module, as :class:`flax.nnx.Dropout` does.
    """

    def __init__(self, in_features: int, d_ff: int, out_features: Optional[int] = None, *,
                 activation: Callable[[Array], Array] = nnx.relu, dropout_rate: float = 0.0,
                 dtype: Optional[Any] = None, param_dtype: Any = jnp.float32,
                 kernel_init=initializers.xavier_uniform(), deterministic: Optional[bool] = None,
                 rngs: nnx.Rngs, keep_rngs: bool = True):
        dense = lambda i, o: nnx.Linear(  # noqa: E731
            i, o, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.wi = dense(in_features, d_ff)
        self.wo = dense(d_ff, out_features or in_features)
        self.activation = activation
        self.dropout = nnx.Dropout(dropout_rate, deterministic=deterministic,
                                   rngs=rngs if keep_rngs and dropout_rate > 0 else None)

    def __call__(self, x: Array, *, deterministic: Optional[bool] = None, rngs=None) -> Array:
        """``[..., E] -> [..., out_features]``."""
        h = self.activation(self.wi(x))
        if self.dropout.rate > 0.0:
            h = self.dropout(h, deterministic=deterministic, rngs=rngs)
        return self.wo(h)
