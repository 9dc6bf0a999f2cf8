"""The sinusoidal position layer (Vaswani et al. 2017, §3.5) as a linen module."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from flax_attention.functional import kv_cache
from flax_attention.linen import _cache
from flax_attention.functional.positions import sinusoidal_encoding

Array = jnp.ndarray


class SinusoidalPositionalEncoding(nn.Module):
    """Adds sinusoidal position encodings to ``x [..., T, E]`` (no parameters).

    With ``decode=True`` the offset is kept as the attention cache keeps its
    index (:mod:`flax_attention.functional.kv_cache`): a scalar int32
    ``'cache'/'position_index'`` advancing by ``T`` per call, plus a
    per-example ``position_lengths [...]`` once a call passes ``lengths``
    (right-padded prompts); so a prefill and the following single-token
    steps get positions ``0, 1, 2, …``. Like the attention cache, it is
    allocated (not advanced) inside ``init``.
    """

    @nn.compact
    def __call__(self, x: Array, *, positions: Optional[Array] = None, decode: bool = False,
                 lengths: Optional[Array] = None) -> Array:
        """Returns ``x + PE(positions)``.

        Args:
          x: ``[..., T, E]``.
          positions: integer ``[T]`` or ``[..., T]``; default ``arange(T)``
            (or the cache offset with ``decode``).
          decode: continue from the cached position index.
          lengths: int ``[...]`` with ``decode``: real positions per example
            (default ``T``).
        """
        t, e = x.shape[-2:]
        batch = x.shape[:-2]
        if positions is None:
            positions = jnp.arange(t, dtype=jnp.int32)
            if decode:
                lengths = kv_cache.check_lengths(lengths, batch, t)
                index, counts = "position_index", "position_lengths"  # this layer's cache variables
                if self.has_variable("cache", index):
                    start = _cache.fill_levels(self, batch, index=index, lengths=counts)
                    positions = start[..., None] + positions
                    _cache.advance(self, start, lengths, t, index=index, lengths=counts)
                else:  # the allocation call, flax's pattern: nothing advances
                    self.variable("cache", index, lambda: jnp.array(0, jnp.int32))
        elif decode:
            raise ValueError("pass either explicit positions or decode=True, not both.")
        return (x + sinusoidal_encoding(positions, e)).astype(x.dtype)
