"""The structural masks the kernels and the functions share: causal, sliding window, their AND.

Boolean, ``True`` = attend, ``[T, S]`` (broadcasting against logits
``[..., N, T, S]``). :mod:`flax_attention.functional.masks` re-exports the
public ones beside the data-dependent masks (padding, segments, ...); the
kernels read the alignment and window arithmetic here to plan their blocks.
"""

from __future__ import annotations

import operator
from typing import Any, Optional, Tuple, Union

import jax.numpy as jnp
import numpy as np

from flax_attention.core.checks import static_int

Array = jnp.ndarray
Window = Union[int, Tuple[int, int]]

ALIGNMENTS = ("bottom_right", "top_left")


def check_alignment(alignment: str, name: str = "causal_alignment") -> None:
    """Raises ``ValueError`` unless ``alignment`` is one of :data:`ALIGNMENTS`."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"{name} must be one of {ALIGNMENTS}, got {alignment!r}.")


def aligned_positions(q_len: int, kv_len: Optional[int], alignment: str) -> Tuple[np.ndarray, np.ndarray]:
    """Absolute positions of queries and keys for a given causal alignment.

    ``bottom_right``: the last query is aligned with the last key, i.e. the
    queries are the final ``T`` positions of a length-``S`` sequence (what a
    decoder continuing from a cache needs). ``top_left``: query ``i`` is
    position ``i`` (what PyTorch's ``is_causal`` does when ``T != S``).

    Returns:
      ``(query_positions [T], key_positions [S])`` as NumPy int arrays.
    """
    q_len = static_int(q_len, "q_len")
    kv_len = q_len if kv_len is None else static_int(kv_len, "kv_len")
    check_alignment(alignment, "alignment")
    offset = kv_len - q_len if alignment == "bottom_right" else 0
    return np.arange(q_len) + offset, np.arange(kv_len)


def window_sizes(window: Any) -> Tuple[int, int]:
    """Parses ``w`` or ``(left, right)`` (user input, validated here) into two non-negative Python ints."""
    def as_int(w):
        if isinstance(w, (bool, np.bool_)):  # True would silently mean a window of 1
            raise TypeError
        return operator.index(w)

    try:
        if np.ndim(window) == 0:
            pair: Tuple[int, ...] = (as_int(window), 0)
        else:
            pair = tuple(as_int(w) for w in window)
    except TypeError:
        pair = ()
    if len(pair) != 2 or min(pair) < 0:
        raise ValueError(
            f"window must be an int w >= 0 or a pair (left, right) of ints >= 0, got {window!r}."
        )
    return pair[0], pair[1]


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
    q_pos, k_pos = aligned_positions(q_len, kv_len, alignment)
    return jnp.asarray(q_pos[:, None] >= k_pos[None, :])


def sliding_window_mask(
    q_len: int,
    kv_len: Optional[int] = None,
    *,
    window: Window,
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
    left, right = window_sizes(window)
    q_pos, k_pos = aligned_positions(q_len, kv_len, alignment)
    diff = q_pos[:, None] - k_pos[None, :]
    return jnp.asarray((diff <= left) & (-diff <= right))


def combine_masks(*masks: Optional[Array]) -> Optional[Array]:
    """Logical AND of any number of masks, broadcasting; ``None`` entries are skipped.

    Returns:
      The combined boolean mask, or ``None`` if every argument was ``None``.
    """
    present = [as_bool(m, "mask") for m in masks if m is not None]
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


def as_bool(mask: Array, name: str) -> Array:
    """``mask`` as a JAX array, which must be boolean (``True`` = attend)."""
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(
            f"{name} must be boolean (True = attend), got dtype {mask.dtype}; "
            f"convert with {name}.astype(bool) or {name} > 0."
        )
    return mask
