"""Fill levels of the NNX decoding caches: flax's scalar index, plus per-example lengths when ragged.

The layout is the linen modules' (:mod:`flax_attention.functional.kv_cache`), kept in
:class:`~flax.nnx.Cache` attributes: a scalar int32 ``cache_index`` (slots
filled) and, once a decode call passes ``lengths`` (right-padded prompts of
different lengths), a per-example ``cache_lengths [...]`` from which
positions are read from then on, ``cache_index`` staying the scalar
high-water mark ``max(cache_lengths)``. The sinusoidal encoding keeps
``position_index``/``position_lengths`` the same way. An example whose write
would pass the cache (or whose traced ``lengths`` are outside ``[0, T]``) is
flagged as overflowed and its fill level moves past ``L``, so every later
step of it is flagged too.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
# index variable -> its per-example twin
RAGGED = {"cache_index": "cache_lengths", "position_index": "position_lengths"}


def ragged(module: nnx.Module, index: str = "cache_index") -> bool:
    return getattr(module, RAGGED[index], None) is not None


def fill_levels(module: nnx.Module, batch: tuple, index: str = "cache_index") -> Array:
    """Each example's next free slot, int32 ``[*batch]``."""
    source = getattr(module, RAGGED[index]) if ragged(module, index) else getattr(module, index)
    return jnp.broadcast_to(jnp.asarray(source[...], jnp.int32), batch)


def advance(module: nnx.Module, start: Array, count: Optional[Array], t: int,
            limit: Optional[int] = None, index: str = "cache_index") -> Tuple[Array, Array]:
    """Moves the fill levels on by ``count`` (``None`` = ``T``); returns ``(count, overflow)`` ``[*batch]``.

    ``start`` comes from :func:`fill_levels`; ``limit`` is the cache length
    (``None`` checks nothing). The per-example variable is created when
    ``count`` is given and updated once it exists; otherwise the scalar index
    advances by ``T``, exactly as flax's.
    """
    is_ragged = count is not None or ragged(module, index)
    count = jnp.broadcast_to(jnp.int32(t), start.shape) if count is None else count
    overflow = jnp.zeros(start.shape, bool)
    if limit is not None:
        count = jnp.where((count < 0) | (count > t), limit + 1, count)  # traced bad lengths poison
        overflow = start + count > limit
    end = start + count
    counter = getattr(module, index)
    if is_ragged:
        if ragged(module, index):
            getattr(module, RAGGED[index])[...] = end
        else:
            setattr(module, RAGGED[index], nnx.Cache(end))
        counter[...] = jnp.max(end, initial=0)  # slots >= the index are empty everywhere
    else:
        counter[...] = jnp.asarray(counter[...], jnp.int32) + t
    return count, overflow
