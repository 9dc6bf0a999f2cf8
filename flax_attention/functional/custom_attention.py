"""Calling a user-supplied attention function with the options it understands.

:class:`~flax_attention.MultiHeadAttention` accepts any ``attention_fn(query,
key, value, **kw)`` (flax's ``nn.dot_product_attention`` for instance). Such a
function may not know this package's options, so :func:`call_attention_fn`
passes only the keyword arguments its signature names and expresses the rest
with what it does take: causality and windows become a boolean mask, a logit
scale is folded into the query, grouped kv heads are repeated to ``N``.
:func:`einsum_attention` is the dense path with pluggable einsums (flax's
``qk_attn_weights_einsum``/``attn_weights_value_einsum``, e.g. AQT's).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention.core.dtypes import compute_dtype
from flax_attention.functional.attention import masked_softmax
from flax_attention.functional.masks import causal_mask, combine_masks, sliding_window_mask

Array = jnp.ndarray


def call_attention_fn(fn: Callable[..., Array], query: Array, key: Array, value: Array, *,
                      mask: Optional[Array] = None, bias: Optional[Array] = None,
                      is_causal: bool = False, window=None, scale: Optional[float] = None,
                      module=None, **options) -> Array:
    """``fn(query, key, value, **kw)`` with ``kw`` restricted to ``fn``'s parameters.

    Args:
      fn: the attention function.
      query: ``[..., T, N, H]``; key: ``[..., S, K, H]``; value: ``[..., S, K, D]``.
      mask: boolean, broadcastable to ``[..., N, T, S]``; ``True`` = attend.
      bias: float logit bias; an error if ``fn`` takes no ``bias``.
      is_causal, window: folded into ``mask`` unless ``fn`` takes them.
      scale: logit scale; folded into the query unless ``fn`` takes it
        (``fn`` is assumed to divide by ``√H``, as every dot-product attention does).
      module: passed as ``module`` (flax's functions sow ``attention_weights``
        into it) when given and accepted.
      **options: any other keyword (``dropout_rate``, ``deterministic``,
        ``dropout_rng``, ``precision``, ``dtype``, ``broadcast_dropout``,
        ``implementation``, ...), passed if ``fn`` takes it.

    Returns:
      ``fn``'s output, ``[..., T, N, D]``.
    """
    accepted = inspect.signature(fn).parameters
    t, s = query.shape[-3], key.shape[-3]
    if is_causal and "is_causal" not in accepted:
        mask, is_causal = combine_masks(mask, causal_mask(t, s)), False
    if window is not None and "window" not in accepted:
        mask, window = combine_masks(mask, sliding_window_mask(t, s, window=window)), None
    if scale is not None and "scale" not in accepted:  # (q·c·√H)·k / √H = c·q·k
        query, scale = query * jnp.asarray(scale * np.sqrt(query.shape[-1]), query.dtype), None
    if bias is not None and "bias" not in accepted:
        raise ValueError("attention_fn takes no `bias`, needed for the bias (or ALiBi) given.")
    g = query.shape[-2] // key.shape[-2]
    if g > 1:  # such functions expect as many kv heads as query heads
        key, value = jnp.repeat(key, g, axis=-2), jnp.repeat(value, g, axis=-2)
    kw = dict(options, mask=mask, bias=bias, is_causal=is_causal, window=window, scale=scale)
    kw = {name: v for name, v in kw.items() if name in accepted and (v is not None or name == "mask")}
    if module is not None and "module" in accepted:
        kw["module"] = module
    return fn(query, key, value, **kw)


def einsum_attention(query: Array, key: Array, value: Array, bias: Optional[Array] = None,
                     mask: Optional[Array] = None, *, scale: Optional[float] = None,
                     dropout_rng: Optional[jax.Array] = None, dropout_rate: float = 0.0,
                     deterministic: bool = True, precision=None, module=None,
                     qk_attn_weights_einsum: Optional[Callable[..., Array]] = None,
                     attn_weights_value_einsum: Optional[Callable[..., Array]] = None) -> Array:
    """Dense attention whose two einsums may be replaced, as in flax's ``dot_product_attention``.

    Unlike flax's, a row with nothing to attend to gives zeros (the
    package's :func:`~flax_attention.masked_softmax`).

    Args:
      query: ``[..., T, N, H]``; key: ``[..., S, N, H]``; value: ``[..., S, N, D]``.
      bias: float, broadcastable to ``[..., N, T, S]``.
      mask: boolean, broadcastable to ``[..., N, T, S]``; ``True`` = attend.
      scale: logit scale; default ``1 / sqrt(H)``.
      dropout_rng, dropout_rate, deterministic: dropout on the weights.
      precision: for the default einsums.
      module: sows ``attention_weights`` into it when given.
      qk_attn_weights_einsum: ``einsum("...qhd,...khd->...hqk", q, k)`` replacement.
      attn_weights_value_einsum: ``einsum("...hqk,...khd->...qhd", w, v)`` replacement.

    Returns:
      ``[..., T, N, D]`` in the query's dtype.

    Raises:
      ValueError: for dropout (``dropout_rate > 0``, not ``deterministic``) without a ``dropout_rng``.
    """
    default = functools.partial(jnp.einsum, precision=precision)
    qk, av = qk_attn_weights_einsum or default, attn_weights_value_einsum or default
    cdt = compute_dtype(query.dtype)
    scale = 1.0 / np.sqrt(query.shape[-1]) if scale is None else scale
    logits = qk("...qhd,...khd->...hqk", query, key).astype(cdt) * jnp.asarray(scale, cdt)
    if bias is not None:
        logits = logits + jnp.asarray(bias, cdt)
    weights = masked_softmax(logits, mask)
    if module is not None:
        module.sow("intermediates", "attention_weights", weights)
    if dropout_rate > 0.0 and not deterministic:
        if dropout_rng is None:
            raise ValueError(f"dropout_rate={dropout_rate} with deterministic=False needs a dropout_rng; "
                             "pass one, or deterministic=True.")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    return av("...hqk,...khd->...qhd", weights.astype(value.dtype), value).astype(query.dtype)


def make_einsums(qk_cls, av_cls) -> dict:
    """flax's ``*_einsum_cls`` attributes instantiated as ``attention_fn`` keywords (``{}`` if unset)."""
    if (qk_cls is None) != (av_cls is None):
        raise ValueError("qk_attn_weights_einsum_cls and attn_weights_value_einsum_cls must be "
                         "given together (as in flax); set both or neither.")
    if qk_cls is None:
        return {}
    return dict(qk_attn_weights_einsum=qk_cls(), attn_weights_value_einsum=av_cls())
