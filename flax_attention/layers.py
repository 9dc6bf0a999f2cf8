"""Transformer building blocks (Vaswani et al. 2017): config, positional
encoding, position-wise feed-forward network, encoder and decoder layers.

Every layer wraps each sub-layer in a residual connection. Post-LN (the
paper, §3.1): ``LayerNorm(x + Dropout(Sublayer(x)))``. Pre-LN
(``pre_ln=True``, Xiong et al. 2020): ``x + Dropout(Sublayer(LayerNorm(x)))``,
with one final LayerNorm after the stack; it trains without warm-up tricks
at depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from flax_attention.multihead import MultiHeadAttention

Array = jnp.ndarray

ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of the encoder–decoder Transformer; defaults = paper base.

    Attributes:
      vocab_size: source vocabulary ``V`` (also the target one when shared).
      output_vocab_size: target vocabulary; ``None`` means ``vocab_size``.
      d_model: ``E``. num_heads: ``N``. num_kv_heads: ``K`` (``None`` = ``N``).
      d_ff: ``F``, the feed-forward hidden size.
      num_encoder_layers, num_decoder_layers: stack depths.
      dropout_rate: residual dropout and dropout on embeddings + positions
        (the paper's ``P_drop``, §5.4).
      attention_dropout_rate: dropout on attention weights (not in the paper).
      activation_dropout_rate: dropout after the FFN activation (not in the paper).
      max_len: longest sequence accepted; the default cache length.
      pre_ln: pre-LN residual blocks instead of the paper's post-LN.
      share_embeddings: one embedding matrix for source and target (§3.4);
        needs equal vocabularies.
      tie_output: the pre-softmax projection is the (target) embedding
        matrix transposed (§3.4); otherwise a separate Dense layer.
      pad_id: padding token id (masked as a key everywhere). Decoder inputs
        must start with a BOS id different from ``pad_id``.
      activation: ``"relu"`` (paper Eq. 2), ``"gelu"`` or ``"silu"``.
      layer_norm_epsilon: LayerNorm epsilon.
      use_bias: biases in attention projections.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); softmax and logits
        stay float32. param_dtype: parameter dtype.
      sow_weights: sow every attention layer's weights into
        ``'intermediates'`` (apply with ``mutable=['intermediates']``).
    """

    vocab_size: int = 32000
    output_vocab_size: Optional[int] = None
    d_model: int = 512
    num_heads: int = 8
    num_kv_heads: Optional[int] = None
    d_ff: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    activation_dropout_rate: float = 0.0
    max_len: int = 512
    pre_ln: bool = False
    share_embeddings: bool = True
    tie_output: bool = True
    pad_id: int = 0
    activation: str = "relu"
    layer_norm_epsilon: float = 1e-6
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    sow_weights: bool = False

    def __post_init__(self):
        problems = []
        if self.d_model % self.num_heads:
            problems.append(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        k = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        if k <= 0 or self.num_heads % k:
            problems.append(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={k}")
        for name in ("dropout_rate", "attention_dropout_rate", "activation_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.share_embeddings and self.output_vocab_size not in (None, self.vocab_size):
            problems.append(
                f"share_embeddings needs output_vocab_size ({self.output_vocab_size}) == "
                f"vocab_size ({self.vocab_size}); set share_embeddings=False")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation={self.activation!r} must be one of {sorted(ACTIVATIONS)}")
        if min(self.vocab_size, self.d_model, self.d_ff, self.max_len) <= 0:
            problems.append("vocab_size, d_model, d_ff and max_len must be positive")
        if problems:
            raise ValueError("TransformerConfig: " + "; ".join(problems) + ".")

    @property
    def target_vocab_size(self) -> int:
        return self.output_vocab_size or self.vocab_size

    @classmethod
    def base(cls, vocab_size: int = 32000, **overrides) -> "TransformerConfig":
        """Transformer-base of the paper (Table 3): E=512, N=8, F=2048, 6+6 layers, P_drop=0.1."""
        return cls(vocab_size=vocab_size, **overrides)

    @classmethod
    def big(cls, vocab_size: int = 32000, **overrides) -> "TransformerConfig":
        """Transformer-big (Table 3): E=1024, N=16, F=4096, P_drop=0.3."""
        kw = dict(d_model=1024, num_heads=16, d_ff=4096, dropout_rate=0.3)
        return cls(vocab_size=vocab_size, **{**kw, **overrides})

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)


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


class SinusoidalPositionalEncoding(nn.Module):
    """Adds sinusoidal position encodings to ``x [..., T, E]`` (no parameters).

    With ``decode=True`` the position offset is kept in
    ``'cache'/'position_index'`` and advances by ``T`` per call, so a prefill
    and the following single-token steps get positions ``0, 1, 2, …``; like the
    attention cache, it is allocated (not advanced) inside ``init``.
    """

    @nn.compact
    def __call__(self, x: Array, *, positions: Optional[Array] = None, decode: bool = False) -> Array:
        """Returns ``x + PE(positions)``.

        Args:
          x: ``[..., T, E]``.
          positions: integer ``[T]`` or ``[..., T]``; default ``arange(T)``
            (or the cache offset with ``decode``).
          decode: continue from the cached position index.
        """
        t, e = x.shape[-2:]
        if positions is None:
            positions = jnp.arange(t)
            if decode:
                initialized = self.has_variable("cache", "position_index")
                index = self.variable("cache", "position_index", lambda: jnp.array(0, jnp.int32))
                if initialized:
                    positions = positions + index.value
                    index.value = index.value + t
        elif decode:
            raise ValueError("pass either explicit positions or decode=True, not both.")
        return (x + sinusoidal_encoding(positions, e)).astype(x.dtype)


class PositionwiseFeedForward(nn.Module):
    """``FFN(x) = act(x W1 + b1) W2 + b2`` applied to each position (Eq. 2).

    Attributes:
      d_ff: hidden size ``F``.
      out_features: output size; defaults to the input's ``E``.
      activation: default ReLU (the paper's ``max(0, ·)``).
      dropout_rate: dropout on the hidden activations.
    """

    d_ff: int
    out_features: Optional[int] = None
    activation: Callable[[Array], Array] = nn.relu
    dropout_rate: float = 0.0
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        """``[..., E] -> [..., out_features]``."""
        dense = lambda f, name: nn.Dense(  # noqa: E731
            f, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init, name=name)
        h = self.activation(dense(self.d_ff, "wi")(x))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return dense(self.out_features or x.shape[-1], "wo")(h)


def _attention(config: TransformerConfig, name: str) -> MultiHeadAttention:
    return MultiHeadAttention(
        num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
        dropout_rate=config.attention_dropout_rate, use_bias=config.use_bias,
        dtype=config.dtype, param_dtype=config.param_dtype,
        sow_weights=config.sow_weights, name=name,
    )


class _Residual(nn.Module):
    """Shared residual wiring: post-LN or pre-LN around one sub-layer."""

    config: TransformerConfig

    def norm(self, name):
        c = self.config
        return nn.LayerNorm(epsilon=c.layer_norm_epsilon, dtype=c.dtype, param_dtype=c.param_dtype, name=name)

    def residual(self, x, sublayer, name, deterministic):
        drop = nn.Dropout(self.config.dropout_rate)
        if self.config.pre_ln:
            return x + drop(sublayer(self.norm(f"{name}_norm")(x)), deterministic=deterministic)
        return self.norm(f"{name}_norm")(x + drop(sublayer(x), deterministic=deterministic))

    def ffn(self, x, deterministic):
        c = self.config
        return PositionwiseFeedForward(
            c.d_ff, activation=ACTIVATIONS[c.activation], dropout_rate=c.activation_dropout_rate,
            dtype=c.dtype, param_dtype=c.param_dtype, name="ffn",
        )(x, deterministic=deterministic)


class TransformerEncoderLayer(_Residual):
    """Self-attention + FFN, each in a residual block (§3.1)."""

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array] = None, *, deterministic: bool = True) -> Array:
        """Encodes ``x [..., S, E]``; ``mask`` broadcastable to ``[..., N, S, S]``."""
        attend = lambda h: _attention(self.config, "self_attention")(  # noqa: E731
            h, mask=mask, deterministic=deterministic)
        x = self.residual(x, attend, "self_attention", deterministic)
        return self.residual(x, lambda h: self.ffn(h, deterministic), "ffn", deterministic)


class TransformerDecoderLayer(_Residual):
    """Masked self-attention, encoder–decoder attention, FFN (§3.1)."""

    @nn.compact
    def __call__(
        self,
        y: Array,
        encoded: Array,
        *,
        self_mask: Optional[Array] = None,
        cross_mask: Optional[Array] = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        """Decodes ``y [..., T, E]`` attending to ``encoded [..., S, E]``.

        Args:
          self_mask: extra self-attention mask, broadcastable to ``[..., N, T, T]``
            (``[..., N, T, L]`` with ``decode``); causality is always applied.
          cross_mask: broadcastable to ``[..., N, T, S]`` (e.g. source key padding).
          decode: use the self-attention KV cache.
        """
        attend_self = lambda h: _attention(self.config, "self_attention")(  # noqa: E731
            h, mask=self_mask, is_causal=True, deterministic=deterministic, decode=decode)
        attend_cross = lambda h: _attention(self.config, "cross_attention")(  # noqa: E731
            h, encoded, mask=cross_mask, deterministic=deterministic)
        y = self.residual(y, attend_self, "self_attention", deterministic)
        y = self.residual(y, attend_cross, "cross_attention", deterministic)
        return self.residual(y, lambda h: self.ffn(h, deterministic), "ffn", deterministic)
