"""All-to-all (DeepSpeed-Ulysses) sequence parallelism.

Inside :func:`jax.shard_map` with the sequence split over ``axis_name``, one
``all_to_all`` turns ``[B, T/P, N, H]`` sequence shards into ``[B, T, N/P, H]``
head shards; any local attention then runs on whole sequences (our dense or
chunked kernel, or a fused GPU/TPU kernel through ``implementation=``), and a
second ``all_to_all`` brings the output back to sequence shards (Jacobs et al.
2023, "DeepSpeed Ulysses", Sec. 3). Communication per device is ``O(T/P)`` per
tensor and does not grow with ``P`` on a fully connected network, unlike the
ring's ``P - 1`` hops; the price is that the heads must divide over the axis
and each device holds the whole sequence for its heads (``O(T·N/P)``).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from jax import lax

from flax_attention.functional.attention import scaled_dot_product_attention
from flax_attention.functional.ring import _axis_size

Array = jnp.ndarray


def ulysses_attention(
    query: Array,
    key: Array,
    value: Optional[Array] = None,
    *,
    axis_name,
    is_causal: bool = False,
    key_mask: Optional[Array] = None,
    scale: Optional[float] = None,
    implementation: Optional[str] = None,
    precision=None,
) -> Array:
    """Per-shard attention by head/sequence all-to-all; same results as the ring.

    Args:
      query: ``[B, T/P, N, H]``, this shard's contiguous piece of the sequence.
      key: ``[B, S/P, K, H]``.
      value: ``[B, S/P, K, D]``; ``None`` means key = value.
      axis_name: the mesh axis the sequence is split over (``P`` shards);
        ``N`` must be divisible by ``P``. When ``K`` is not, the kv heads are
        repeated to ``N`` first (exact, more traffic).
      is_causal: causal mask over global positions (bottom-right aligned).
      key_mask: boolean ``[B, S/P]``, ``True`` = a real key; gathered over the
        axis (``S`` booleans per example).
      scale: logit scale; defaults to ``1 / sqrt(H)``.
      implementation: the local kernel on whole sequences (see
        :func:`~flax_attention.functional.attention.scaled_dot_product_attention`).
      precision: passed to the local kernel.

    Returns:
      ``[B, T/P, N, D]`` in the query's dtype.

    Raises:
      ValueError: on an unbound ``axis_name``, heads not divisible by the axis
        size, or shapes the local kernel rejects.
    """
    size = _axis_size(axis_name)
    value = key if value is None else value
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(f"ulysses_attention takes [B, T, N, H] shards, got query {query.shape}, "
                         f"key {key.shape}, value {value.shape}.")
    n, kh = query.shape[2], key.shape[2]
    if n % size:
        raise ValueError(f"ulysses_attention: {n} query heads do not divide over the {size} devices of axis "
                         f"{axis_name!r}; use ring_attention (context_parallel_attention(method='ring')).")
    if kh % size:  # GQA with fewer kv heads than devices: repeat to one kv head per query head
        key, value = (jnp.repeat(x, n // kh, axis=2) for x in (key, value))

    def to_heads(x):  # [B, L/P, heads, X] -> [B, L, heads/P, X]
        return lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)

    q, k, v = to_heads(query), to_heads(key), to_heads(value)
    mask = None
    if key_mask is not None:
        full = lax.all_gather(jnp.asarray(key_mask), axis_name, axis=1, tiled=True)  # [B, S]
        mask = full[:, None, None, :]
    out = scaled_dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal,
                                       implementation=implementation, precision=precision)
    return lax.all_to_all(out, axis_name, split_axis=1, concat_axis=2, tiled=True)
