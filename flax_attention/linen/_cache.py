"""The cache variables of a linen module (flax's ``"cache"`` collection) over :mod:`flax_attention.functional.kv_cache`.

Each function takes the calling module (``self`` inside ``__call__``) and reads
or writes its ``cached_key``/``cached_value``/``cache_index`` (and, once
ragged, ``cache_lengths``) exactly where flax keeps them.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax.numpy as jnp

from flax_attention.functional.kv_cache import INDEX, LENGTHS, check_fits, check_lengths, query_positions, write_cache

Array = jnp.ndarray


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
