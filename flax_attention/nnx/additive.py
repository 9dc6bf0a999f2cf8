"""Additive attention modules, Flax NNX: the twins of :mod:`flax_attention.linen.additive`.

Parameters carry the linen modules' names (``w``, ``b``, ``u``; ``w_query``,
``w_key``, ``v``) and shapes, so :mod:`flax_attention.nnx.convert` moves them
between the two. NNX builds parameters eagerly, hence the input feature sizes
in the constructors (linen reads them from the first input).
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
from flax import nnx
from flax.nnx.nn import initializers

from flax_attention.functional.additive import additive_attention, context_attention

Array = jax.Array


class AdditiveAttention(nnx.Module):
    """Attention pooling with a learned context vector (Yang et al. 2016).

    Args:
      in_features: ``D``, the feature size of ``hidden``.
      attention_size: ``A``, the width of the scoring layer.
      kernel_init: initializer of ``w [D, A]``, ``b [A]`` and ``u [A]``.
      param_dtype: parameter dtype.
      rngs: parameter initialisation keys.
    """

    def __init__(self, in_features: int, attention_size: int = 50, *,
                 kernel_init=initializers.normal(0.1), param_dtype=jax.numpy.float32,
                 rngs: nnx.Rngs):
        self.w = nnx.Param(kernel_init(rngs.params(), (in_features, attention_size), param_dtype))
        self.b = nnx.Param(kernel_init(rngs.params(), (attention_size,), param_dtype))
        self.u = nnx.Param(kernel_init(rngs.params(), (attention_size,), param_dtype))

    def __call__(self, hidden: Array, mask: Optional[Array] = None) -> Tuple[Array, Array]:
        """Pools ``hidden [..., S, D]`` into ``(context [..., D], weights [..., S])``.

        ``mask``: boolean ``[..., S]``, ``True`` = real token; a row without
        one gives a zero context.
        """
        return context_attention(hidden, self.w[...], self.b[...], self.u[...], mask=mask)


class BahdanauAttention(nnx.Module):
    """Query–key additive attention ``vᵀ tanh(W_q q + W_k k)`` (Bahdanau et al. 2015).

    Args:
      query_features: ``Eq``. key_features: ``Ek``. attention_size: ``A``.
      kernel_init: initializer of ``w_query [Eq, A]`` and ``w_key [Ek, A]``;
        ``v [A]`` is drawn from ``normal(1/√A)`` as in the linen module.
      param_dtype: parameter dtype.
      rngs: parameter initialisation keys.
    """

    def __init__(self, query_features: int, key_features: int, attention_size: int, *,
                 kernel_init=initializers.lecun_normal(), param_dtype=jax.numpy.float32,
                 rngs: nnx.Rngs):
        a = attention_size
        self.w_query = nnx.Param(kernel_init(rngs.params(), (query_features, a), param_dtype))
        self.w_key = nnx.Param(kernel_init(rngs.params(), (key_features, a), param_dtype))
        self.v = nnx.Param(initializers.normal(1.0 / a**0.5)(rngs.params(), (a,), param_dtype))

    def __call__(self, query: Array, key: Array, value: Optional[Array] = None,
                 mask: Optional[Array] = None) -> Tuple[Array, Array]:
        """Returns ``(context [..., T, D], weights [..., T, S])``; see :func:`~flax_attention.additive_attention`."""
        return additive_attention(query, key, value, self.w_query[...], self.w_key[...],
                                  self.v[...], mask=mask)
