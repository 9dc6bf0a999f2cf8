"""Boolean attention masks: ``True`` = attend.

Every function returns a boolean array that broadcasts against attention
logits of shape ``[..., N, T, S]`` (see the shape legend in
:mod:`flax_attention`). Lengths and token ids are traced values, so changing
them never retraces a jitted caller; sequence lengths that set an output shape
(``max_length``, ``q_len``, ``kv_len``) are static Python ints.
"""

from __future__ import annotations

import operator
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention.functional._validation import static_int

Array = jnp.ndarray

_ALIGNMENTS = ("bottom_right", "top_left")


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


def _aligned_positions(q_len: int, kv_len: Optional[int], alignment: str) -> Tuple[np.ndarray, np.ndarray]:
    """Absolute positions of queries and keys for a given causal alignment.

    ``bottom_right``: the last query is aligned with the last key, i.e. the
    queries are the final ``T`` positions of a length-``S`` sequence (what a
    decoder continuing from a cache needs). ``top_left``: query ``i`` is
    position ``i`` (what PyTorch's ``is_causal`` does when ``T != S``).
    """
    q_len = static_int(q_len, "q_len")
    kv_len = q_len if kv_len is None else static_int(kv_len, "kv_len")
    if alignment not in _ALIGNMENTS:
        raise ValueError(f"alignment must be one of {_ALIGNMENTS}, got {alignment!r}.")
    offset = kv_len - q_len if alignment == "bottom_right" else 0
    return np.arange(q_len) + offset, np.arange(kv_len)


def causal_mask(q_len: int, kv_len: Optional[int] = None, *, alignment: str = "bottom_right") -> Array:
    """Lower-triangular mask: no query attends to a later key.

    For ``q_len != kv_len`` the alignment matters. With the default
    ``"bottom_right"`` query ``i`` sees keys ``j <= i + (kv_len - q_len)``; with
    ``"top_left"`` it sees keys ``j <= i``. If ``q_len > kv_len`` and
    ``bottom_right``, the first ``q_len - kv_len`` rows see nothing (output zeros).

    Args:
      q_len: static ``T``.
      kv_len: static ``S``; defaults to ``T``.
      alignment: ``"bottom_right"`` (default) or ``"top_left"``.

    Returns:
      Boolean ``[T, S]`` (broadcasts against ``[..., N, T, S]``).
    """
    q_pos, k_pos = _aligned_positions(q_len, kv_len, alignment)
    return jnp.asarray(q_pos[:, None] >= k_pos[None, :])


def sliding_window_mask(
    q_len: int,
    kv_len: Optional[int] = None,
    *,
    window: Union[int, Tuple[int, int]],
    alignment: str = "bottom_right",
) -> Array:
    """Local attention: query at position ``p`` sees keys in ``[p - left, p + right]``.

    Args:
      q_len: static ``T``.
      kv_len: static ``S``; defaults to ``T``.
      window: ``(left, right)`` non-negative ints, or one int ``w`` meaning
        ``(w, 0)``: the causal sliding window of Longformer/Mistral style
        (the query and its ``w`` predecessors).
      alignment: how query positions map onto key positions, as in
        :func:`causal_mask`.

    Returns:
      Boolean ``[T, S]``.
    """
    left, right = _window_sizes(window)
    q_pos, k_pos = _aligned_positions(q_len, kv_len, alignment)
    diff = q_pos[:, None] - k_pos[None, :]
    return jnp.asarray((diff <= left) & (-diff <= right))


def _window_sizes(window) -> Tuple[int, int]:
    """Parses ``w`` or ``(left, right)`` into two non-negative Python ints."""
    def as_int(w):
        if isinstance(w, (bool, np.bool_)):  # True would silently mean a window of 1
            raise TypeError
        return operator.index(w)

    try:
        if np.ndim(window) == 0:
            pair = (as_int(window), 0)
        else:
            pair = tuple(as_int(w) for w in window)
    except TypeError:
        pair = ()
    if len(pair) != 2 or min(pair) < 0:
        raise ValueError(
            f"window must be an int w >= 0 or a pair (left, right) of ints >= 0, got {window!r}."
        )
    return pair


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


def combine_masks(*masks: Optional[Array]) -> Optional[Array]:
    """Logical AND of any number of masks, broadcasting; ``None`` entries are skipped.

    Returns:
      The combined boolean mask, or ``None`` if every argument was ``None``.
    """
    present = [_as_bool(m, "mask") for m in masks if m is not None]
    if not present:
        return None
    try:
        np.broadcast_shapes(*(m.shape for m in present))
    except ValueError:
        raise ValueError(
            "combine_masks: masks do not broadcast together, shapes "
            f"{[tuple(m.shape) for m in present]}; give each the layout [..., N, T, S] "
            "(use 1 for broadcast axes)."
        ) from None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


def _as_bool(mask: Array, name: str) -> Array:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(
            f"{name} must be boolean (True = attend), got dtype {mask.dtype}; "
            f"convert with {name}.astype(bool) or {name} > 0."
        )
    return mask


def _as_sequence_mask(mask: Array, name: str, axis: str) -> Array:
    """A boolean ``[..., L]`` (rank >= 1) validity vector."""
    mask = _as_bool(mask, name)
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
