"""Pure functions behind the KV cache of :class:`~flax_attention.MultiHeadAttention`.

A cache holds ``L`` slots per example; slot ``j`` holds the key/value of
position ``j``. Every example has its own fill level ``index [...]`` (int32),
so one batch may hold prompts of different lengths: prompts are
**right-padded**, the prefill writes all ``T`` columns but advances each
example by its own length, and the padding slots it wrote are overwritten by
the next tokens before any query can see them (a query at position ``p``
only sees slots ``<= p``).

All index arithmetic is int32, also under ``jax.enable_x64``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax.numpy as jnp

from flax_attention.masks import _window_sizes

Array = jnp.ndarray


def query_positions(index: Array, t: int) -> Array:
    """Absolute positions ``index + arange(T)`` of the ``T`` new queries: int32 ``[..., T]``."""
    return jnp.asarray(index, jnp.int32)[..., None] + jnp.arange(t, dtype=jnp.int32)


def write_cache(cache: Array, new: Array, index: Array, count: Array) -> Tuple[Array, Array]:
    """Writes ``new[..., :count]`` into slots ``index .. index + count - 1``, per example.

    An example whose write would pass the last slot is left untouched (never
    a clamped write over valid entries) and flagged.

    Args:
      cache: ``[..., L, K, H]``.
      new: ``[..., T, K, H]``.
      index: int ``[...]``, first slot to write per example.
      count: int ``[...]``, how many of the ``T`` new entries are real (``<= T``).

    Returns:
      ``(cache [..., L, K, H], overflow bool [...])``.
    """
    length, t = cache.shape[-3], new.shape[-3]
    index = jnp.asarray(index, jnp.int32)
    count = jnp.asarray(count, jnp.int32)
    overflow = index + count > length
    step = jnp.arange(t, dtype=jnp.int32)
    keep = (step < count[..., None]) & ~overflow[..., None]  # [..., T]
    # A scatter of T rows, O(T) per step: skipped rows go to slot L, which
    # mode="drop" discards (dynamic_update_slice would clamp them onto valid slots).
    slots = jnp.where(keep, index[..., None] + step, length).reshape(-1, t)
    flat = cache.reshape(-1, *cache.shape[-3:])
    rows = jnp.arange(flat.shape[0], dtype=jnp.int32)[:, None]
    flat = flat.at[rows, slots].set(new.reshape(-1, *new.shape[-3:]).astype(cache.dtype), mode="drop")
    return flat.reshape(cache.shape), overflow


def position_mask(query_pos: Array, key_pos: Array, *, causal: bool = True,
                  window: Optional[object] = None) -> Array:
    """Boolean ``[..., 1, T, S]`` from absolute positions ``[..., T]`` and ``[..., S]``.

    ``causal``: key ``j`` visible to query ``i`` only if ``j <= i``.
    ``window``: additionally ``i - left <= j <= i + right``.
    """
    diff = jnp.asarray(query_pos)[..., :, None] - jnp.asarray(key_pos)[..., None, :]
    keep = diff >= 0 if causal else jnp.ones(diff.shape, bool)
    if window is not None:
        left, right = _window_sizes(window)
        keep = keep & (diff <= left) & (-diff <= right)
    return keep[..., None, :, :]
