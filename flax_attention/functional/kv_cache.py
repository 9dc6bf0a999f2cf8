"""KV-cache arithmetic (pure functions): flax's cache layout, plus ragged prompts.

The linen modules keep these variables through :mod:`flax_attention.linen._cache`,
the NNX modules through :mod:`flax_attention.nnx._cache`.


**Layout** (the ``"cache"`` collection, exactly that of
:class:`flax.linen.MultiHeadDotProductAttention` and shared by the NNX
module): ``cached_key [..., L, K, H]``, ``cached_value [..., L, K, D]`` and a
scalar int32 ``cache_index``, the number of slots filled; slot ``j`` holds
position ``j``. Code written for flax (``int(cache["cache_index"])``, its
decoding loops, checkpoints of its caches) works unchanged.

**Ragged prompts** (an addition): a decode call given ``lengths [...]``
(right-padded prompts of different lengths) adds ``cache_lengths [...]``
(int32), each example's own fill level, and from then on that variable is
what positions are read from; ``cache_index`` stays the scalar high-water
mark ``max(cache_lengths)``. The prefill writes all ``T`` columns but
advances each example by its own length; the padding slots it wrote are
overwritten by the next tokens before any query can see them (a query at
position ``p`` only sees slots ``<= p``). A cache that never saw ``lengths``
keeps flax's three variables only.

**Overflow** under ``jit`` (where it cannot raise): an example whose write
would pass slot ``L - 1`` (or whose traced ``lengths`` are outside
``[0, T]``) is not written, its output is NaN, and its fill level moves past
``L``, so every later step of it is NaN too (no extra flag variable).

The same scheme keeps ``position_index`` (``position_lengths`` when ragged)
for :class:`~flax_attention.functional.positions.SinusoidalPositionalEncoding`. All index
arithmetic is int32, also under ``jax.enable_x64``.
"""

from __future__ import annotations

import enum
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention.core.masks import window_sizes

Array = jnp.ndarray
INDEX, LENGTHS = "cache_index", "cache_lengths"


class DecodeMode(enum.Enum):
    """What one attention call does with its cache; decided once, from flax's call arguments."""

    OFF = "off"        # no cache: plain attention
    APPEND = "append"  # self-attention decoding: write the T new positions, attend to the filled slots
    STORE = "store"    # static_kv with a new memory: project it and keep it (cross-attention)
    REUSE = "reuse"    # static_kv without inputs_k: attend to the memory kept by an earlier call


def decode_mode(decode: bool, static_kv: bool, new_memory: bool) -> DecodeMode:
    """The :class:`DecodeMode` of a call with ``decode``/``static_kv``; ``new_memory``: ``inputs_k`` given."""
    if not decode:
        return DecodeMode.OFF
    if not static_kv:
        return DecodeMode.APPEND
    return DecodeMode.STORE if new_memory else DecodeMode.REUSE


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
      count: int ``[...]``, how many of the ``T`` new entries are real.

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
        left, right = window_sizes(window)
        keep = keep & (diff <= left) & (-diff <= right)
    return keep[..., None, :, :]


def check_lengths(lengths, batch: tuple, t: int) -> Optional[Array]:
    """Validates a decode call's ``lengths``; returns them as int32 ``[*batch]`` (``None`` stays ``None``).

    Raises a ValueError for a non-integer dtype, a shape that is not the
    batch's (or a scalar), and, when the values are concrete, any value
    outside ``[0, T]``. Traced values outside it poison their example (see
    the module docstring).
    """
    if lengths is None:
        return None
    arr = jnp.asarray(lengths)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"lengths must be integers (real new positions per example), got dtype {arr.dtype}; "
                         "pass e.g. jnp.asarray(lengths, jnp.int32).")
    if arr.ndim and arr.shape != tuple(batch):
        raise ValueError(f"lengths has shape {arr.shape}; it must be the inputs' batch shape {tuple(batch)} "
                         "(one count per example) or a scalar.")
    if not isinstance(arr, jax.core.Tracer):
        bad = np.asarray(arr)[(np.asarray(arr) < 0) | (np.asarray(arr) > t)]
        if bad.size:
            raise ValueError(f"lengths must be in [0, T={t}] (the new positions of this call), "
                             f"got {bad.tolist()}.")
    return jnp.broadcast_to(arr.astype(jnp.int32), batch)


def poison(out: Array, overflow: Array) -> Array:
    """``out [..., T, F...]`` with the rows of overflowed examples (``overflow [...]``) set to NaN."""
    flag = overflow.reshape(overflow.shape + (1,) * (out.ndim - overflow.ndim))
    return jnp.where(flag, jnp.nan, out).astype(out.dtype)


def check_fits(start, lengths, t: int, length: int, fix: str) -> None:
    """Raises a ValueError (ending in ``fix``) when a decode step of ``T = t`` new positions
    (``lengths`` of them per example, if given) written at fill levels ``start`` would pass the
    cache length ``L``. Traced levels or lengths are checked only against ``T <= L``; past that
    the step poisons its example (see the module docstring)."""
    if t > length:
        raise ValueError(f"decode step of T={t} positions cannot fit in a cache of length L={length}; {fix}.")
    count = t if lengths is None else lengths
    if not isinstance(start, jax.core.Tracer) and not isinstance(count, jax.core.Tracer):
        last = int(np.max(np.asarray(start) + np.asarray(count), initial=0))
        if last > length:
            raise ValueError(f"decode step writes up to position {last - 1}, past the cache length "
                             f"L={length}; {fix}.")
