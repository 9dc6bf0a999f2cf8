"""Boolean attention masks: ``True`` = attend.

Every function returns a boolean array that broadcasts against attention
logits of shape ``[..., N, T, S]`` (see the shape legend in
:mod:`flax_attention`). Lengths and token ids are traced values, so changing
them never retraces a jitted caller; sequence lengths that set an output shape
(``max_length``, ``q_len``, ``kv_len``) are static Python ints.

The structural masks (:func:`causal_mask`, :func:`sliding_window_mask`) and
:func:`combine_masks` live in :mod:`flax_attention.core.masks`, below the
kernels that also use them, and are re-exported here.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention.core.checks import static_int
from flax_attention.core.masks import as_bool, causal_mask, combine_masks, sliding_window_mask

Array = jnp.ndarray

__all__ = ["causal_mask", "causal_mask_from_positions", "combine_masks", "key_mask", "padding_mask",
           "query_key_mask", "segment_mask", "sliding_window_mask", "token_mask"]


def padding_mask(lengths: Array, max_length: int) -> Array:
    """Marks the first ``lengths`` positions of each sequence as real.

    Args:
      lengths: integer array ``[...]`` of true sequence lengths.
      max_length: static padded length ``L``.

    Returns:
      Boolean ``[..., L]``; ``True`` where ``position < length``.

    Raises:
      ValueError: for non-integer lengths, a ``max_length`` that is not an int
        ``>= 0``, or negative lengths (checked when the lengths are concrete).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax_attention import padding_mask
      >>> padding_mask(jnp.array([3, 1]), 4)
      Array([[ True,  True,  True, False],
             [ True, False, False, False]], dtype=bool)
    """
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"padding_mask: lengths must be integers, got dtype {lengths.dtype}; "
            "cast with lengths.astype(jnp.int32)."
        )
    max_length = static_int(max_length, "padding_mask: max_length")
    # NumPy, not jnp: inside a trace (jit, eval_shape) a jnp reduction of even a
    # concrete array is staged, and int() of it would fail.
    if not isinstance(lengths, jax.core.Tracer) and lengths.size and int(np.min(np.asarray(lengths))) < 0:
        raise ValueError(
            f"padding_mask: lengths must be >= 0, got negative values {np.asarray(lengths)}; "
            "a negative length would silently mean an empty sequence."
        )
    return jnp.arange(max_length) < lengths[..., None]


def token_mask(token_ids: Array, pad_id: int = 0) -> Array:
    """Marks every token that is not padding.

    Args:
      token_ids: integer array ``[..., L]``.
      pad_id: the padding id.

    Returns:
      Boolean ``[..., L]``; ``True`` where ``token_ids != pad_id``.
    """
    return jnp.asarray(token_ids) != pad_id


def key_mask(key_valid: Array) -> Array:
    """Expands a per-key validity vector ``[..., S]`` to ``[..., 1, 1, S]``.

    Use it when only the keys are padded (e.g. an encoder's source padding in
    cross-attention): every query and head sees the same keys.

    Examples:
      Key padding combined with a causal mask, ready for ``[B, N, T, S]`` logits:

      >>> import jax.numpy as jnp
      >>> from flax_attention import causal_mask, combine_masks, key_mask, padding_mask
      >>> keys = key_mask(padding_mask(jnp.array([3]), 4))
      >>> keys.shape
      (1, 1, 1, 4)
      >>> combine_masks(keys, causal_mask(4))[0, 0]
      Array([[ True, False, False, False],
             [ True,  True, False, False],
             [ True,  True,  True, False],
             [ True,  True,  True, False]], dtype=bool)
    """
    return _as_sequence_mask(key_valid, "key_valid", "S")[..., None, None, :]


def query_key_mask(query_valid: Array, key_valid: Array) -> Array:
    """Outer AND of query and key validity: ``[..., T]`` x ``[..., S]`` -> ``[..., 1, T, S]``.

    Query rows that are padding get no keys at all; their output is zeros.
    """
    q = _as_sequence_mask(query_valid, "query_valid", "T")
    k = _as_sequence_mask(key_valid, "key_valid", "S")
    _check_batch("query_key_mask", q, k)
    return (q[..., :, None] & k[..., None, :])[..., None, :, :]


def causal_mask_from_positions(query_positions: Array, key_positions: Array) -> Array:
    """Causal mask from absolute positions: query at ``p`` sees keys at ``<= p``.

    This is the primitive behind :func:`causal_mask` and KV-cache decoding,
    where the query positions are traced (``cache_index + arange(T)``).

    Args:
      query_positions: integer ``[..., T]``.
      key_positions: integer ``[..., S]``.

    Returns:
      Boolean ``[..., 1, T, S]``.
    """
    q = jnp.asarray(query_positions)
    k = jnp.asarray(key_positions)
    return (q[..., :, None] >= k[..., None, :])[..., None, :, :]


def segment_mask(query_segment_ids: Array, key_segment_ids: Optional[Array] = None) -> Array:
    """Packed sequences: a token attends only within its own segment.

    Args:
      query_segment_ids: integer ``[..., T]``; by convention segment id ``0``
        marks padding, which attends to nothing and is attended by nothing.
      key_segment_ids: integer ``[..., S]``; defaults to the query ids.

    Returns:
      Boolean ``[..., 1, T, S]``.

    Raises:
      ValueError: for non-integer or rank-0 ids, or batch dims ``[...]`` that
        do not broadcast together.
    """
    q = _as_ids(query_segment_ids, "query_segment_ids")
    k = q if key_segment_ids is None else _as_ids(key_segment_ids, "key_segment_ids")
    _check_batch("segment_mask", q, k)
    same = q[..., :, None] == k[..., None, :]
    real = (q[..., :, None] != 0) & (k[..., None, :] != 0)
    return (same & real)[..., None, :, :]


def _as_sequence_mask(mask: Array, name: str, axis: str) -> Array:
    """A boolean ``[..., L]`` (rank >= 1) validity vector."""
    mask = as_bool(mask, name)
    if mask.ndim < 1:
        raise ValueError(f"{name} must be a boolean [..., {axis}] array (rank >= 1), got shape {mask.shape}.")
    return mask


def _as_ids(ids: Array, name: str) -> Array:
    """Integer ``[..., L]`` segment ids (rank >= 1)."""
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer segment ids, got dtype {ids.dtype}; cast with .astype(int).")
    if ids.ndim < 1:
        raise ValueError(f"{name} must be [..., L] (rank >= 1), got shape {ids.shape}.")
    return ids


def _check_batch(fn: str, q: Array, k: Array) -> None:
    """The batch dims ``[...]`` of a ``[..., T]`` and a ``[..., S]`` input must broadcast."""
    try:
        np.broadcast_shapes(q.shape[:-1], k.shape[:-1])
    except ValueError:
        raise ValueError(
            f"{fn}: the batch dims [...] of [..., T] and [..., S] do not broadcast; got shapes "
            f"{tuple(q.shape)} and {tuple(k.shape)}."
        ) from None
