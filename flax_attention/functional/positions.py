"""Relative position schemes as pure functions: rotary embeddings and ALiBi.

* RoPE (Su et al. 2021, "RoFormer", §3.4, Eq. 34): query and key head vectors
  are rotated pair-wise by an angle proportional to their absolute position, so
  ``<R_m q, R_n k> = <q, R_{n-m} k>`` depends on the offset ``n - m`` only.
* Sinusoidal absolute encodings (Vaswani et al. 2017, §3.5), added to the
  embeddings: :func:`sinusoidal_encoding` (the linen layer:
  :class:`flax_attention.linen.positions.SinusoidalPositionalEncoding`).
* ALiBi (Press et al. 2022, "Train Short, Test Long", §3): no position
  embedding; each head ``n`` adds ``-m_n · |i - j|`` to the logit of query
  ``i`` and key ``j``, with geometric slopes ``m_n``. For causal attention only
  ``j <= i`` is visible and this is the paper's bias ``m · [-(i-1), …, -1, 0]``.
  The paper has no bidirectional form; a symmetric ``|i - j|`` is
  mirror-invariant (see :func:`alibi_bias`), so keys to the right may get
  other slopes (``right_slopes``).

Positions are integer arrays ``[..., T]`` (may be traced, e.g. a KV-cache
offset), so the same code serves teacher forcing and cached decoding.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


Array = jnp.ndarray


def sinusoidal_encoding(positions: Array, features: int, max_timescale: float = 10000.0) -> Array:
    """Sinusoidal encodings of arbitrary (possibly traced) positions (§3.5).

    ``PE(pos, 2i) = sin(pos / 10000^(2i/E))``, ``PE(pos, 2i+1) = cos(pos / 10000^(2i/E))``
    (sine and cosine interleaved, as in the paper's formula).

    Args:
      positions: integer or float ``[..., T]``.
      features: ``E`` (odd values drop the last cosine).

    Returns:
      float32 ``[..., T, E]``.
    """
    dims = np.arange(features)
    # Dims 2i and 2i+1 share the frequency 10000^(-2i/E).
    inv_freq = np.power(max_timescale, -(dims - dims % 2) / features).astype(np.float32)
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
    return jnp.where(dims % 2 == 0, jnp.sin(angles), jnp.cos(angles))


def sinusoidal_positions(length: int, features: int, *, offset: Any = 0) -> Array:
    """The table ``PE[offset : offset + length]`` of :func:`sinusoidal_encoding`.

    Args:
      length: static ``T``.
      features: ``E``.
      offset: first position (may be traced, e.g. a cache index).

    Returns:
      float32 ``[T, E]``.
    """
    return sinusoidal_encoding(offset + jnp.arange(int(length)), features)


def relative_positions(positions: Optional[Array], key_positions: Optional[Array], t: int, s: int,
                       same_inputs: bool) -> Tuple[Array, Array]:
    """Query ``[..., T]`` and key ``[..., S]`` positions for RoPE/ALiBi (outside decoding).

    Defaults: ``arange``. Explicit query ``positions`` place the keys too when
    the keys are the queries' sequence (``same_inputs``, or ``S == T`` as in
    flax's ``layer(x, x)``); keys of another length need ``key_positions``.
    """
    q_pos = jnp.arange(t, dtype=jnp.int32) if positions is None else jnp.asarray(positions)
    if key_positions is not None:
        return q_pos, jnp.asarray(key_positions)
    if positions is not None and (same_inputs or s == t):
        return q_pos, q_pos
    if positions is not None:
        raise ValueError(f"positions were given for T={t} queries but the S={s} keys have none; "
                         "pass key_positions [..., S] as well.")
    return q_pos, jnp.arange(s, dtype=jnp.int32)


def rotary_angles(positions: Array, head_dim: int, base: float = 10000.0) -> Array:
    """Rotation angles ``m · θ_i`` with ``θ_i = base^(-2i/H)`` (Eq. 15 of the paper).

    Args:
      positions: integer or float ``[..., T]``.
      head_dim: ``H`` (even).
      base: the ``10000`` of the paper.

    Returns:
      float32 ``[..., T, H/2]``.
    """
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dim, got H={head_dim}.")
    inv_freq = np.power(base, -np.arange(0, head_dim, 2) / head_dim).astype(np.float32)
    return jnp.asarray(positions, jnp.float32)[..., None] * inv_freq


def apply_rotary(x: Array, positions: Array, base: float = 10000.0) -> Array:
    """Rotates each head vector of ``x`` by its position (RoPE, Eq. 34).

    Dimensions ``(2i, 2i+1)`` form the ``i``-th pair (the paper's interleaved
    layout); the pair turns by ``positions · θ_i``.

    Args:
      x: ``[..., T, N, H]`` queries or keys (any ``N``, e.g. ``K`` kv heads).
      positions: integer ``[..., T]`` (broadcastable against ``x``'s leading dims).
      base: frequency base.

    Returns:
      ``[..., T, N, H]`` in ``x``'s dtype (computed in float32).
    """
    h = x.shape[-1]
    angles = rotary_angles(positions, h, base)[..., None, :]  # [..., T, 1, H/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], h // 2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The per-head ALiBi slopes ``m_n`` (Press et al. 2022, §3).

    For ``N`` a power of two: the geometric sequence starting at and with
    ratio ``2^(-8/N)`` (``N = 8``: ``1/2, 1/4, …, 1/256``). Otherwise, as the
    authors do: the slopes of the closest power of two ``P < N``, followed by
    every other slope of ``2P`` for the remaining ``N - P`` heads.

    Returns:
      float32 ``[N]``, decreasing for a power of two.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}.")

    def geometric(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = geometric(p) + geometric(2 * p)[0::2][: num_heads - p]
    return np.asarray(slopes, np.float32)


def alibi_bias(slopes: ArrayLike, query_positions: ArrayLike, key_positions: ArrayLike,
               right_slopes: Optional[ArrayLike] = None) -> Array:
    """ALiBi logit bias ``-m_n · |i - j|`` (keys ``j > i`` use ``right_slopes`` if given).

    The symmetric form is mirror-invariant: with no other position signal,
    reversing the input mirrors every output, so a model cannot tell its
    first token from its last. ``right_slopes`` (e.g. the slopes in reversed
    head order) breaks that symmetry for bidirectional attention; causal
    attention never sees ``j > i``, so it is the paper's bias either way.

    Args:
      slopes: ``[N]`` (e.g. :func:`alibi_slopes`), for keys ``j <= i``.
      query_positions: integer ``[..., T]``.
      key_positions: integer ``[..., S]``.
      right_slopes: ``[N]`` for keys ``j > i``; default ``slopes``.

    Returns:
      float32 ``[..., N, T, S]``; pass it as ``bias`` to
      :func:`~flax_attention.scaled_dot_product_attention`.
    """
    q = jnp.asarray(query_positions, jnp.float32)[..., None, :, None]
    k = jnp.asarray(key_positions, jnp.float32)[..., None, None, :]
    m = jnp.asarray(slopes, jnp.float32)[:, None, None]
    if right_slopes is not None:
        m = jnp.where(k > q, jnp.asarray(right_slopes, jnp.float32)[:, None, None], m)
    return -m * jnp.abs(q - k)
