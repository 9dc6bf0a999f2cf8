"""Transformer building blocks, Flax NNX: twins of :mod:`flax_attention.linen.layers`.

The feed-forward block and the encoder/decoder layers take the same
:class:`~flax_attention.TransformerConfig` and name every sub-module as the
linen layers do (``self_attention``, ``self_attention_norm``,
``cross_attention``, ``cross_attention_norm``, ``ffn`` with ``wi``/``wo``,
``ffn_norm``), so :mod:`flax_attention.nnx.convert` moves parameters both ways.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from flax_attention.linen.layers import ACTIVATIONS, TransformerConfig
from flax_attention.nnx.multihead import MultiHeadAttention

Array = jax.Array


class PositionwiseFeedForward(nnx.Module):
    """``FFN(x) = act(x W1 + b1) W2 + b2`` applied to each position (Vaswani et al. 2017, Eq. 2).

    Sub-modules ``wi`` and ``wo`` (:class:`~flax.nnx.Linear`) carry the linen
    module's names, so :mod:`flax_attention.nnx.convert` moves parameters both ways.

    Args:
      in_features: ``E``. d_ff: hidden size ``F``.
      out_features: output size; ``None`` = ``E``.
      activation: default ReLU (the paper's ``max(0, ·)``).
      dropout_rate: dropout on the hidden activations.
      dtype, param_dtype, kernel_init: as :class:`~flax.nnx.Linear`.
      deterministic: disables dropout; the call argument takes precedence (flax NNX's rule).
      rngs: parameter keys; with ``keep_rngs`` (default) and dropout, also the dropout stream.
      keep_rngs: keep a dropout stream in the module, as :class:`flax.nnx.Dropout` does.
    """

    def __init__(self, in_features: int, d_ff: int, out_features: Optional[int] = None, *,
                 activation: Callable[[Array], Array] = nnx.relu, dropout_rate: float = 0.0,
                 dtype: Optional[Any] = None, param_dtype: Any = jnp.float32,
                 kernel_init=initializers.xavier_uniform(), deterministic: Optional[bool] = None,
                 rngs: nnx.Rngs, keep_rngs: bool = True):
        dense = lambda i, o: nnx.Linear(  # noqa: E731
            i, o, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.wi = dense(in_features, d_ff)
        self.wo = dense(d_ff, out_features or in_features)
        self.activation = activation
        self.dropout = nnx.Dropout(dropout_rate, deterministic=deterministic,
                                   rngs=rngs if keep_rngs and dropout_rate > 0 else None)

    def __call__(self, x: Array, *, deterministic: Optional[bool] = None, rngs=None) -> Array:
        """``[..., E] -> [..., out_features]``."""
        h = self.activation(self.wi(x))
        if self.dropout.rate > 0.0:
            h = self.dropout(h, deterministic=deterministic, rngs=rngs)
        return self.wo(h)


def _attention(config: TransformerConfig, rngs: nnx.Rngs, cross: bool = False) -> MultiHeadAttention:
    """One attention layer of the config, as the linen layers build it (self-attention gets
    the position scheme and the window)."""
    c = config
    relative = c.position if c.position in ("rope", "alibi") and not cross else None
    return MultiHeadAttention(
        c.num_heads, c.d_model, num_kv_heads=c.num_kv_heads, dropout_rate=c.attention_dropout_rate,
        use_bias=c.use_bias, dtype=c.dtype, param_dtype=c.param_dtype, attention_fn=c.attention_fn,
        kernel_init=initializers.xavier_uniform(), window=None if cross else c.attention_window,
        implementation=c.attention_implementation, scale=c.attention_scale,
        relative_position=relative, rope_base=c.rope_base, alibi_directional=True, rngs=rngs)


def layer_norm(config: TransformerConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(config.d_model, epsilon=config.layer_norm_epsilon, dtype=config.dtype,
                         param_dtype=config.param_dtype, rngs=rngs)


class _Residual(nnx.Module):
    """Shared residual wiring: post-LN ``LayerNorm(x + Dropout(f(x)))`` or pre-LN
    ``x + Dropout(f(LayerNorm(x)))``; the norm of sub-layer ``name`` is ``{name}_norm``."""

    def _init_common(self, config: TransformerConfig, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.dropout = nnx.Dropout(c.dropout_rate, rngs=rngs if c.dropout_rate > 0 else None)
        self.ffn = PositionwiseFeedForward(
            c.d_model, c.d_ff, activation=ACTIVATIONS[c.activation],
            dropout_rate=c.activation_dropout_rate, dtype=c.dtype, param_dtype=c.param_dtype,
            rngs=rngs)
        self.ffn_norm = layer_norm(c, rngs)

    def residual(self, x, sublayer, name, deterministic):
        norm = getattr(self, f"{name}_norm")
        if self.config.pre_ln:
            return x + self.dropout(sublayer(norm(x)), deterministic=deterministic)
        return norm(x + self.dropout(sublayer(x), deterministic=deterministic))

    def feed_forward(self, x, deterministic):
        return self.residual(x, lambda h: self.ffn(h, deterministic=deterministic), "ffn",
                             deterministic)


class TransformerEncoderLayer(_Residual):
    """Self-attention + FFN, each in a residual block (§3.1); twin of the linen layer."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.self_attention = _attention(config, rngs)
        self.self_attention_norm = layer_norm(config, rngs)
        self._init_common(config, rngs)

    def __call__(self, x: Array, mask: Optional[Array] = None, *, deterministic: bool = True) -> Array:
        """Encodes ``x [..., S, E]``; ``mask`` broadcastable to ``[..., N, S, S]``."""
        attend = lambda h: self.self_attention(  # noqa: E731
            h, mask=mask, deterministic=deterministic, sow_weights=self.config.sow_weights)
        x = self.residual(x, attend, "self_attention", deterministic)
        return self.feed_forward(x, deterministic)


class TransformerDecoderLayer(_Residual):
    """Masked self-attention, encoder–decoder attention, FFN (§3.1); twin of the linen layer."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.self_attention = _attention(config, rngs)
        self.self_attention_norm = layer_norm(config, rngs)
        self.cross_attention = _attention(config, rngs, cross=True)
        self.cross_attention_norm = layer_norm(config, rngs)
        self._init_common(config, rngs)

    def __call__(self, y: Array, encoded: Optional[Array], *, self_mask: Optional[Array] = None,
                 cross_mask: Optional[Array] = None, deterministic: bool = True,
                 decode: bool = False, lengths: Optional[Array] = None) -> Array:
        """Decodes ``y [..., T, E]`` attending to ``encoded [..., S, E]``.

        As :class:`flax_attention.TransformerDecoderLayer`: ``encoded=None`` with
        ``decode`` reuses the cross-attention memory cached by an earlier decode
        call; ``self_mask`` ``[..., N, T, T]`` (``[..., N, T, L]`` with ``decode``)
        on top of causality; ``cross_mask`` ``[..., N, T, S]``; ``lengths`` int
        ``[...]``: real new positions per example while decoding.
        """
        if encoded is None and not decode:
            raise ValueError("encoded=None is only valid with decode=True (cached cross-attention).")
        sow = self.config.sow_weights
        attend_self = lambda h: self.self_attention(  # noqa: E731
            h, mask=self_mask, is_causal=True, deterministic=deterministic, decode=decode,
            lengths=lengths, sow_weights=sow)
        attend_cross = lambda h: self.cross_attention(  # noqa: E731
            h, encoded, mask=cross_mask, deterministic=deterministic, decode=decode,
            static_kv=True, sow_weights=sow)
        y = self.residual(y, attend_self, "self_attention", deterministic)
        y = self.residual(y, attend_cross, "cross_attention", deterministic)
        return self.feed_forward(y, deterministic)
