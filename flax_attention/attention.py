"""Scaled dot-product attention as pure functions (Vaswani et al. 2017, Eq. 1).

``Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V``

Layouts follow the shape legend of :mod:`flax_attention`: query ``[..., T, N, H]``,
key ``[..., S, K, H]``, value ``[..., S, K, D]``, output ``[..., T, N, D]``,
weights ``[..., N, T, S]``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention.masks import causal_mask, combine_masks

Array = jnp.ndarray


def masked_softmax(logits: Array, mask: Optional[Array] = None, axis: int = -1) -> Array:
    """Softmax that gives exact zeros, and finite gradients, to fully-masked rows.

    Computed in float32 whatever the input dtype (the caller casts back).
    ``-inf`` entries in ``logits`` (e.g. from an additive bias) behave like
    masked entries. A row where every entry is masked or ``-inf`` yields zeros,
    never NaN: this is the guarantee ``jax.nn.softmax`` and PyTorch's SDPA do
    not make.

    Args:
      logits: ``[..., S]`` (any float dtype).
      mask: boolean, broadcastable to ``logits``; ``True`` = keep.
      axis: the axis to normalise over.

    Returns:
      float32 probabilities, same shape as ``logits``.
    """
    logits = logits.astype(jnp.float32)
    if mask is not None:
        # Fill before exp: a `where` after exp would leak NaN into gradients of
        # masked entries whose exp overflowed.
        logits = jnp.where(mask, logits, -jnp.inf)
    # Softmax is shift-invariant, so the max needs no gradient; rows that are
    # all -inf shift by 0 and produce exp(-inf) = 0 everywhere.
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=axis, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    unnormalized = jnp.exp(logits - row_max)
    denom = jnp.sum(unnormalized, axis=axis, keepdims=True)
    return unnormalized / jnp.where(denom > 0, denom, 1.0)


def _check_inputs(query, key, value, mask, bias):
    """Validates shapes at trace time so users never see a raw XLA error."""
    if query.ndim < 3:
        raise ValueError(
            f"query must be [..., T, N, H] (rank >= 3), got shape {query.shape}; "
            "add a heads axis with query[..., None, :] for single-head attention."
        )
    for name, x in (("key", key), ("value", value)):
        if x.ndim != query.ndim:
            raise ValueError(
                f"{name} must have the same rank as query ([..., S, K, H] vs [..., T, N, H]); "
                f"got query {query.shape} and {name} {x.shape}."
            )
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]:
        raise ValueError(
            "query, key and value must share batch dims [...]; got "
            f"query {query.shape}, key {key.shape}, value {value.shape}."
        )
    if key.shape[-3:-1] != value.shape[-3:-1]:
        raise ValueError(
            f"key [..., S, K, H] and value [..., S, K, D] must agree on S and K; "
            f"got key {key.shape} and value {value.shape}."
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query and key head dims H must match; got query {query.shape} and key {key.shape}."
        )
    n, k = query.shape[-2], key.shape[-2]
    if k == 0 or n % k:
        raise ValueError(
            f"query heads N={n} must be a multiple of kv heads K={k} "
            f"(query {query.shape}, key {key.shape}); choose K among the divisors of N."
        )
    logits_shape = query.shape[:-3] + (n, query.shape[-3], key.shape[-3])
    for name, x in (("mask", mask), ("bias", bias)):
        if x is None:
            continue
        if name == "mask" and x.dtype != jnp.bool_:
            raise ValueError(
                f"mask must be boolean (True = attend), got dtype {x.dtype}; "
                "pass mask.astype(bool), or use `bias` for additive float masks."
            )
        try:
            if np.broadcast_shapes(x.shape, logits_shape) != logits_shape:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{name} of shape {x.shape} does not broadcast to the logits shape "
                f"[..., N, T, S] = {logits_shape}."
            ) from None


def attention_weights(
    query: Array,
    key: Array,
    *,
    mask: Optional[Array] = None,
    bias: Optional[Array] = None,
    scale: Optional[float] = None,
    is_causal: bool = False,
    causal_alignment: str = "bottom_right",
    precision=None,
) -> Array:
    """Attention probabilities ``softmax(Q Kᵀ · scale + bias)`` over keys.

    Args:
      query: ``[..., T, N, H]``.
      key: ``[..., S, K, H]`` with ``N % K == 0``.
      mask: boolean, broadcastable to ``[..., N, T, S]``; ``True`` = attend.
      bias: float, broadcastable to ``[..., N, T, S]``, added to the logits
        (``-inf`` entries act as a mask).
      scale: logit scale; defaults to ``1 / sqrt(H)``.
      is_causal: also apply :func:`~flax_attention.masks.causal_mask`.
      causal_alignment: ``"bottom_right"`` or ``"top_left"`` when ``T != S``.
      precision: passed to the einsum.

    Returns:
      float32 ``[..., N, T, S]``; fully-masked rows are all zeros.
    """
    value = key  # only shapes are checked here
    _check_inputs(query, key, value, mask, bias)
    *batch, t, n, h = query.shape
    s, k = key.shape[-3], key.shape[-2]
    g = n // k
    scale = 1.0 / np.sqrt(h) if scale is None else scale
    # Grouped heads: split N into (K, G) so each kv head serves G query heads
    # without materialising repeated keys.
    q = query.reshape(*batch, t, k, g, h)
    logits = jnp.einsum(
        "...tkgh,...skh->...kgts", q, key,
        precision=precision, preferred_element_type=jnp.float32,
    )
    logits = logits.reshape(*batch, n, t, s) * jnp.float32(scale)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if is_causal:
        mask = combine_masks(mask, causal_mask(t, s, alignment=causal_alignment))
    return masked_softmax(logits, mask)


def scaled_dot_product_attention(
    query: Array,
    key: Array,
    value: Optional[Array] = None,
    *,
    mask: Optional[Array] = None,
    bias: Optional[Array] = None,
    scale: Optional[float] = None,
    is_causal: bool = False,
    causal_alignment: str = "bottom_right",
    dropout_rate: float = 0.0,
    dropout_rng: Optional[jax.Array] = None,
    deterministic: bool = True,
    return_weights: bool = False,
    precision=None,
):
    """Scaled dot-product attention, ``softmax(Q Kᵀ / √H) V`` (Vaswani et al., Eq. 1).

    Logits and softmax are computed in float32 for every input dtype; the
    output has the query's dtype. Supports grouped/multi-query kv heads
    (``N % K == 0``), a value head dim ``D`` different from ``H``, and any
    number of leading batch dims.

    Args:
      query: ``[..., T, N, H]``.
      key: ``[..., S, K, H]``.
      value: ``[..., S, K, D]``; ``None`` means key = value.
      mask: boolean, broadcastable to ``[..., N, T, S]``; ``True`` = attend.
        Rows with nothing to attend to output zeros.
      bias: float, broadcastable to ``[..., N, T, S]``, added to the logits.
      scale: logit scale; defaults to ``1 / sqrt(H)``.
      is_causal: apply a causal mask (combined with ``mask``).
      causal_alignment: ``"bottom_right"`` (default: the queries are the last
        ``T`` positions) or ``"top_left"`` when ``T != S``.
      dropout_rate: dropout on the attention weights.
      dropout_rng: PRNG key, required when dropout is active.
      deterministic: disables dropout when ``True``.
      return_weights: also return the (pre-dropout) weights.
      precision: passed to both einsums.

    Returns:
      ``[..., T, N, D]`` in the query's dtype, or ``(output, weights)`` with
      float32 weights ``[..., N, T, S]`` if ``return_weights``.

    Raises:
      ValueError: on mismatched shapes, indivisible heads, or a non-boolean mask.
    """
    value = key if value is None else value
    _check_inputs(query, key, value, mask, bias)
    weights = attention_weights(
        query, key, mask=mask, bias=bias, scale=scale, is_causal=is_causal,
        causal_alignment=causal_alignment, precision=precision,
    )
    probs = weights
    if dropout_rate > 0.0 and not deterministic:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 with deterministic=False needs a dropout_rng key.")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    *batch, t, n, _ = query.shape
    s, k, d = value.shape[-3:]
    probs = probs.reshape(*batch, k, n // k, t, s).astype(value.dtype)
    out = jnp.einsum(
        "...kgts,...skd->...tkgd", probs, value,
        precision=precision, preferred_element_type=jnp.float32,
    )
    out = out.reshape(*batch, t, n, d).astype(query.dtype)
    return (out, weights) if return_weights else out
