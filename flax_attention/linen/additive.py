"""Additive (Bahdanau) attention as linen modules over :mod:`flax_attention.functional.additive`."""

from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from flax_attention.functional.additive import (  # noqa: F401  (additive_scores re-exported with the modules)
    additive_attention,
    additive_scores,
    context_attention,
)
from flax_attention.linen.partitioning import logical

Array = jnp.ndarray


class AdditiveAttention(nn.Module):
    """Attention pooling with a learned context vector (the reference BiGRU model's layer).

    Attributes:
      attention_size: ``A``, the width of the scoring layer.
    """

    attention_size: int = 50
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.1)

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array] = None) -> Tuple[Array, Array]:
        """Pools ``hidden [..., S, D]`` into ``(context [..., D], weights [..., S])``."""
        d = hidden.shape[-1]
        w = self.param("w", logical(self.kernel_init, ("embed", "mlp")), (d, self.attention_size))
        b = self.param("b", logical(self.kernel_init, ("mlp",)), (self.attention_size,))
        u = self.param("u", logical(self.kernel_init, ("mlp",)), (self.attention_size,))
        return context_attention(hidden, w, b, u, mask=mask)


class BahdanauAttention(nn.Module):
    """Query–key additive attention ``vᵀ tanh(W_q q + W_k k)``.

    Attributes:
      attention_size: ``A``.
    """

    attention_size: int
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(
        self, query: Array, key: Array, value: Optional[Array] = None, mask: Optional[Array] = None
    ) -> Tuple[Array, Array]:
        """Returns ``(context [..., T, D], weights [..., T, S])``; see :func:`additive_attention`."""
        a = self.attention_size
        w_q = self.param("w_query", logical(self.kernel_init, ("embed", "mlp")), (query.shape[-1], a))
        w_k = self.param("w_key", logical(self.kernel_init, ("embed", "mlp")), (key.shape[-1], a))
        v = self.param("v", logical(nn.initializers.normal(1.0 / a**0.5), ("mlp",)), (a,))
        return additive_attention(query, key, value, w_q, w_k, v, mask=mask)
