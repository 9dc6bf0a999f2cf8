"""The KV cache of :class:`~flax_attention.MultiHeadAttention`: flax's layout, plus ragged prompts.

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

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention.functional.masks import _window_sizes

Array = jnp.ndarray
INDEX, LENGTHS = "cache_index", "cache_lengths"


# ------------------------------------------------------------ pure functions

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
        left, right = _window_sizes(window)
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


# ------------------------------------------- the variables of a linen module

def fill_levels(module, batch: tuple, index: str = INDEX, lengths: str = LENGTHS) -> Array:
    """Each example's next free slot, int32 ``[*batch]`` (zeros before the cache exists)."""
    for name in (lengths, index):
        if module.has_variable("cache", name):
            return jnp.broadcast_to(jnp.asarray(module.get_variable("cache", name), jnp.int32), batch)
    return jnp.zeros(batch, jnp.int32)


def decode_positions(module, batch: tuple, t: int) -> Tuple[Array, Array, Array]:
    """``(start [*batch], query positions [*batch, T], key positions [L])`` of a decode call.

    Before the cache exists (the allocation call) the keys are the queries.
    """
    start = fill_levels(module, batch)
    q_pos = query_positions(start, t)
    if not module.has_variable("cache", "cached_key"):
        return start, q_pos, q_pos
    return start, q_pos, jnp.arange(module.get_variable("cache", "cached_key").shape[-3], dtype=jnp.int32)


def advance(module, start: Array, count: Optional[Array], t: int, limit: Optional[int] = None,
            index: str = INDEX, lengths: str = LENGTHS) -> Tuple[Array, Array]:
    """Advances the fill levels by ``count`` (``None`` = ``T``); returns ``(count, overflow)`` ``[*batch]``.

    ``start`` comes from :func:`fill_levels`. Traced counts outside ``[0, T]``
    become ``limit + 1`` (an overflow); ``limit=None`` checks nothing.
    The scalar ``index`` is created if missing (flax's layout); the
    per-example ``lengths`` only when ``count`` is given or it already exists.
    """
    ragged = count is not None or module.has_variable("cache", lengths)
    counter = module.variable("cache", index, lambda: jnp.array(0, jnp.int32))
    count = jnp.broadcast_to(jnp.int32(t), start.shape) if count is None else count
    overflow = jnp.zeros(start.shape, bool)
    if limit is not None:
        count = jnp.where((count < 0) | (count > t), limit + 1, count)
        overflow = start + count > limit
    end = start + count
    if ragged:
        module.put_variable("cache", lengths, end)
        counter.value = jnp.max(end, initial=0)  # slots >= cache_index are empty everywhere
    else:
        counter.value = jnp.asarray(counter.value, jnp.int32) + t
    return count, overflow


def check_decode(module, inputs_q: Array, inputs_k: Array, inputs_v: Array, lengths) -> Optional[Array]:
    """Raises a ValueError for a decode call that cannot be right; returns the validated ``lengths``."""
    if inputs_k.shape[:-1] != inputs_q.shape[:-1] or inputs_v.shape[:-1] != inputs_q.shape[:-1]:
        raise ValueError(
            "decode=True caches self-attention keys, so inputs_k/inputs_v must have the query's "
            f"[..., T] shape; got inputs_q {inputs_q.shape} and inputs_k {inputs_k.shape}. "
            "Call cross-attention with decode=False or static_kv=True.")
    batch, t = inputs_q.shape[:-2], inputs_q.shape[-2]
    lengths = check_lengths(lengths, batch, t)
    if not module.has_variable("cache", "cached_key"):
        if module.is_initializing():
            return lengths  # the allocation call
        raise ValueError(
            "decode=True found no 'cache' collection: create it with model.init(..., decode=True) "
            "on inputs of the maximum length (or flax_attention.init_cache) and pass it with "
            "mutable=['cache'].")
    cache_shape = module.get_variable("cache", "cached_key").shape
    *cache_batch, length, _, _ = cache_shape
    if batch != tuple(cache_batch):
        raise ValueError(f"decode inputs {inputs_q.shape} do not match the cache {cache_shape} "
                         "([..., L, K, H]) in batch dims; re-create the cache for this batch shape.")
    check_fits(fill_levels(module, batch), lengths, t, length,
               "initialise the cache with a longer input (the maximum total length)")
    return lengths


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


def update(module, key: Array, value: Array, start: Array, lengths: Optional[Array]):
    """Writes the new keys/values at each example's ``start``; returns ``(key, value, overflow)``.

    ``key``/``value`` are ``[..., T, K, H|D]``; the returned ones are the full
    cache ``[..., L, K, H|D]`` (the inputs themselves on the allocation call,
    which creates flax's variables and writes nothing).
    """
    initialized = module.has_variable("cache", "cached_key")
    cached_key = module.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = module.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    if not initialized:
        module.variable("cache", INDEX, lambda: jnp.array(0, jnp.int32))
        return key, value, jnp.zeros(start.shape, bool)
    count, overflow = advance(module, start, lengths, key.shape[-3], limit=cached_key.value.shape[-3])
    cached_key.value, _ = write_cache(cached_key.value, key, start, count)
    cached_value.value, _ = write_cache(cached_value.value, value, start, count)
    # The cache is storage: a cache allocated in another dtype (e.g. from a float64
    # dummy input under jax_enable_x64) must not turn this step into mixed-dtype attention.
    return cached_key.value.astype(key.dtype), cached_value.value.astype(value.dtype), overflow


def static_memory(module, key: Optional[Array], value: Optional[Array]):
    """Stores (``key`` given) or returns (``key=None``) a cross-attention memory ``[..., S, K, H|D]``."""
    if key is not None:
        module.put_variable("cache", "cached_key", key)
        module.put_variable("cache", "cached_value", value)
        return key, value
    if not module.has_variable("cache", "cached_key"):
        raise ValueError("static_kv decoding without inputs_k needs an earlier call that passed "
                         "inputs_k (it stores the projected memory in the 'cache').")
    return module.get_variable("cache", "cached_key"), module.get_variable("cache", "cached_value")
