"""Additive (Bahdanau) attention as pure functions (the linen modules: :mod:`flax_attention.linen.additive`).

Two forms:

* query–key scoring (Bahdanau et al. 2015, Eq. 6 / appendix A.1.2):
  ``e_ts = vᵀ tanh(W_q q_t + W_k k_s)``, then ``softmax_s`` and a weighted sum of
  the values;
* learned context vector, used for classification (Yang et al. 2016, Eq. 5-7):
  ``u_s = tanh(W h_s + b)``, ``α_s = softmax_s(uᵀ u_s)``, ``c = Σ_s α_s h_s``.

Masks are boolean with ``True`` = attend, broadcastable to ``[..., T, S]``
(``[..., S]`` for the context-vector form). Padding gets exactly zero weight,
and a sequence with no real token (or no token at all, ``S = 0``) returns a
zero context. Scores and softmax are computed in at least float32 and at
least the input precision (float64 stays float64); integer inputs are
rejected.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax.numpy as jnp
import numpy as np

from flax_attention.core.checks import as_array
from flax_attention.core.dtypes import compute_dtype
from flax_attention.functional.attention import masked_softmax

Array = jnp.ndarray


def additive_scores(query: Array, key: Array, w_query: Array, w_key: Array, v: Array) -> Array:
    """Bahdanau scores ``vᵀ tanh(W_q q_t + W_k k_s)``.

    Args:
      query: ``[..., T, Eq]``.
      key: ``[..., S, Ek]``.
      w_query: ``[Eq, A]``.
      w_key: ``[Ek, A]``.
      v: ``[A]``.

    Returns:
      Scores ``[..., T, S]`` in the compute dtype (float32, or float64 for
      float64 inputs).
    """
    query, key = _floating(query=query, key=key)
    w_query, w_key, v = (jnp.asarray(x) for x in (w_query, w_key, v))
    cdt = compute_dtype(jnp.result_type(query.dtype, key.dtype, w_query.dtype, w_key.dtype))
    if query.ndim < 2 or key.ndim < 2 or query.shape[:-2] != key.shape[:-2]:
        raise ValueError(
            f"query [..., T, Eq] and key [..., S, Ek] need the same batch dims; "
            f"got {query.shape} and {key.shape}."
        )
    a = v.shape[0] if v.ndim == 1 else None
    for name, w, rows in (("w_query", w_query, query.shape[-1]), ("w_key", w_key, key.shape[-1])):
        if w.shape != (rows, a):
            raise ValueError(
                f"{name} of shape {w.shape} must be [{rows}, A] with A = v.shape[0] "
                f"(v: {v.shape}, query {query.shape}, key {key.shape})."
            )
    q = jnp.einsum("...te,ea->...ta", query, w_query, preferred_element_type=cdt)
    k = jnp.einsum("...se,ea->...sa", key, w_key, preferred_element_type=cdt)
    # Broadcast to [..., T, S, A]: the memory cost that makes this form O(T·S·A).
    hidden = jnp.tanh(q[..., :, None, :] + k[..., None, :, :])
    return jnp.einsum("...tsa,a->...ts", hidden, v.astype(cdt))


def additive_attention(
    query: Array,
    key: Array,
    value: Optional[Array],
    w_query: Array,
    w_key: Array,
    v: Array,
    *,
    mask: Optional[Array] = None,
) -> Tuple[Array, Array]:
    """Bahdanau attention: context vectors and weights.

    Args:
      query: ``[..., T, Eq]`` (e.g. decoder states).
      key: ``[..., S, Ek]`` (e.g. encoder annotations).
      value: ``[..., S, D]``; ``None`` means key = value.
      w_query, w_key, v: parameters as in :func:`additive_scores`.
      mask: boolean, broadcastable to ``[..., T, S]``; ``True`` = attend.

    Returns:
      ``(context [..., T, D], weights [..., T, S])``; context in the value's
      dtype, weights in the compute dtype.
    """
    value = key if value is None else value
    query, key, value = _floating(query=query, key=key, value=value)
    if value.shape[:-1] != key.shape[:-1]:
        raise ValueError(f"key [..., S, Ek] and value [..., S, D] disagree: {key.shape} vs {value.shape}.")
    scores = additive_scores(query, key, w_query, w_key, v)
    _check_mask(mask, scores.shape, "[..., T, S]")
    weights = masked_softmax(scores, mask)
    context = jnp.einsum("...ts,...sd->...td", weights, value.astype(weights.dtype))
    return context.astype(value.dtype), weights


def context_attention(
    hidden: Array, w: Array, b: Array, u: Array, *, mask: Optional[Array] = None
) -> Tuple[Array, Array]:
    """Attention pooling with a learned context vector ``u`` (Yang et al. 2016).

    Args:
      hidden: ``[..., S, D]`` (e.g. BiGRU outputs).
      w: ``[D, A]``; b: ``[A]``; u: ``[A]``.
      mask: boolean ``[..., S]``; ``True`` = real token.

    Returns:
      ``(context [..., D], weights [..., S])``; padded positions get weight 0.
    """
    (hidden,) = _floating(hidden=hidden)
    w, b, u = (jnp.asarray(x) for x in (w, b, u))
    cdt = compute_dtype(jnp.result_type(hidden.dtype, w.dtype))
    if hidden.ndim < 2 or u.ndim != 1 or w.shape != (hidden.shape[-1], u.shape[0]) or b.shape != u.shape:
        raise ValueError(
            f"context_attention expects hidden [..., S, D], w [D, A], b [A], u [A]; got hidden "
            f"{hidden.shape}, w of shape {w.shape}, b {b.shape}, u {u.shape}."
        )
    if mask is not None and jnp.ndim(mask) and jnp.shape(mask)[-1] != hidden.shape[-2]:
        raise ValueError(
            f"mask [..., S] must match hidden [..., S, D]; got {jnp.shape(mask)} and {hidden.shape}."
        )
    _check_mask(mask, hidden.shape[:-1], "[..., S]")
    proj = jnp.tanh(jnp.einsum("...sd,da->...sa", hidden, w, preferred_element_type=cdt) + b.astype(cdt))
    weights = masked_softmax(jnp.einsum("...sa,a->...s", proj, u.astype(cdt)), mask)
    context = jnp.einsum("...s,...sd->...d", weights, hidden.astype(weights.dtype))
    return context.astype(hidden.dtype), weights


def _floating(**arrays):
    """Array-likes as arrays; integer inputs would silently give truncated scores."""
    out = []
    for name, x in arrays.items():
        x = as_array(x, name)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"{name} must be a floating array, got dtype {x.dtype}; cast it, e.g. "
                f"{name}.astype(jnp.float32)."
            )
        out.append(x)
    return out


def _check_mask(mask, target_shape, legend):
    """A boolean mask that broadcasts to ``target_shape`` without enlarging it."""
    if mask is None:
        return
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(
            f"mask must be boolean (True = attend), got dtype {mask.dtype}; use mask.astype(bool)."
        )
    try:
        ok = np.broadcast_shapes(mask.shape, tuple(target_shape)) == tuple(target_shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"mask of shape {mask.shape} does not broadcast to {legend} = {tuple(target_shape)}."
        )
