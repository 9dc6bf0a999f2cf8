"""Calling a user-supplied attention function with the options it understands.

:class:`~flax_attention.MultiHeadAttention` accepts any ``attention_fn(query,
key, value, **kw)`` (flax's ``nn.dot_product_attention`` for instance). Such a
function may not know this package's options, so :func:`call_attention_fn`
passes only the keyword arguments its signature names and expresses the rest
with what it does take: causality and windows become a boolean mask, a logit
scale is folded into the query, grouped kv heads are repeated to ``N``.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np

from flax_attention.masks import causal_mask, combine_masks, sliding_window_mask

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
