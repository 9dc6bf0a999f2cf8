"""Transformer building blocks (Vaswani et al. 2017): config, position-wise
feed-forward network, encoder and decoder layers (the positional encodings
live in :mod:`flax_attention.functional.positions` and are re-exported here).

Every layer wraps each sub-layer in a residual connection. Post-LN (the
paper, §3.1): ``LayerNorm(x + Dropout(Sublayer(x)))``. Pre-LN
(``pre_ln=True``, Xiong et al. 2020): ``x + Dropout(Sublayer(LayerNorm(x)))``,
with one final LayerNorm after the stack; it trains without warm-up tricks
at depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Dict, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from flax_attention.functional.context_parallel import IMPLEMENTATIONS as CONTEXT_PARALLEL
from flax_attention.kernels.backend_select import parse_implementation
from flax_attention.linen.multihead import MultiHeadAttention
from flax_attention.linen.partitioning import logical
from flax_attention.functional.positions import sinusoidal_encoding, sinusoidal_positions  # noqa: F401  (re-exported)
from flax_attention.linen.positions import SinusoidalPositionalEncoding  # noqa: F401  (re-exported)

Array = jnp.ndarray

ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu}
POSITIONS = ("sinusoidal", "rope", "alibi", "none")


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
      position: ``"sinusoidal"`` (absolute encodings added to the embeddings,
        §3.5), ``"rope"`` (rotary q/k in every self-attention, Su et al. 2021),
        ``"alibi"`` (linear distance biases in every self-attention, Press et
        al. 2022; in the encoder, keys to the right get the slopes in reversed
        head order: a symmetric ``|i - j|`` is mirror-invariant) or ``"none"``. Only
        ``"sinusoidal"`` adds anything to the embeddings; cross-attention never
        gets a position signal.
      rope_base: RoPE frequency base.
      attention_window: sliding window of every self-attention (``w`` or
        ``(left, right)``, see :func:`~flax_attention.sliding_window_mask`).
      attention_implementation: ``None`` (auto), ``"dense"``, ``"chunked"``
        or a fused kernel such as ``"cudnn"`` or ``"pallas_tpu"``, passed to
        :func:`~flax_attention.scaled_dot_product_attention` (see its list).
      attention_scale: logit scale; ``None`` = ``1/√H``.
      attention_fn: custom attention function of every attention layer (see
        :class:`~flax_attention.MultiHeadAttention`); ``None`` = the package's.
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
    position: str = "sinusoidal"
    rope_base: float = 10000.0
    # Fields added after workdirs were written, with the value older runs used
    # (for the trainer's config check on resume; the None-valued ones need none).
    ADDED_FIELDS: ClassVar[Dict[str, Any]] = {"position": "sinusoidal", "rope_base": 10000.0}
    attention_window: Any = None
    attention_implementation: Optional[str] = None
    attention_scale: Optional[float] = None
    attention_fn: Optional[Callable[..., Array]] = None

    def __post_init__(self):
        if isinstance(self.attention_window, list):  # e.g. read back from JSON: keep the config hashable
            object.__setattr__(self, "attention_window", tuple(self.attention_window))
        problems = []
        if self.position not in POSITIONS:
            problems.append(f"position={self.position!r} must be one of {POSITIONS}")
        elif self.position == "rope" and (self.d_model // self.num_heads) % 2:
            problems.append(f"position='rope' needs an even head dim, got {self.d_model // self.num_heads}")
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
        if self.attention_implementation not in (None, *CONTEXT_PARALLEL):
            try:  # a typo must fail here, not at the first call
                parse_implementation(self.attention_implementation)
            except ValueError as err:
                problems.append(f"attention_implementation: {err}".rstrip("."))
        if self.attention_scale is not None and np.shape(self.attention_scale) != ():
            problems.append(f"attention_scale must be a number, got shape {np.shape(self.attention_scale)}")
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

    @classmethod
    def added_fields(cls) -> Dict[str, Any]:
        """:attr:`ADDED_FIELDS` as ``{"model.field": value}`` (see :func:`~flax_attention.checkpointing.load_config`)."""
        return {f"model.{k}": v for k, v in cls.ADDED_FIELDS.items()}

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)


class PositionwiseFeedForward(nn.Module):
    """``FFN(x) = act(x W1 + b1) W2 + b2`` applied to each position (Eq. 2).

    Attributes:
      d_ff: hidden size ``F``.
      out_features: output size; defaults to the input's ``E``.
      activation: default ReLU (the paper's ``max(0, ·)``).
      dropout_rate: dropout on the hidden activations.
      deterministic: as in flax: with ``dropout_rate > 0`` exactly one of this
        attribute and the call argument must be given.
    """

    d_ff: int
    out_features: Optional[int] = None
    activation: Callable[[Array], Array] = nn.relu
    dropout_rate: float = 0.0
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
    deterministic: Optional[bool] = None

    @nn.compact
    def __call__(self, x: Array, *, deterministic: Optional[bool] = None) -> Array:
        """``[..., E] -> [..., out_features]``."""
        dense = lambda f, axes, name: nn.Dense(  # noqa: E731
            f, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=logical(self.kernel_init, axes),
            bias_init=logical(nn.initializers.zeros_init(), axes[1:]), name=name)
        h = self.activation(dense(self.d_ff, ("embed", "mlp"), "wi")(x))
        if self.dropout_rate > 0.0:
            det = nn.merge_param("deterministic", self.deterministic, deterministic)
            h = nn.Dropout(self.dropout_rate)(h, deterministic=det)
        return dense(self.out_features or x.shape[-1], ("mlp", "embed"), "wo")(h)


def _attention(config: TransformerConfig, name: str, cross: bool = False) -> MultiHeadAttention:
    """One attention layer of the config; self-attention gets the position scheme and window."""
    relative = config.position if config.position in ("rope", "alibi") and not cross else None
    return MultiHeadAttention(
        num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
        dropout_rate=config.attention_dropout_rate, use_bias=config.use_bias,
        dtype=config.dtype, param_dtype=config.param_dtype,
        sow_weights=config.sow_weights, attention_fn=config.attention_fn,
        window=None if cross else config.attention_window,
        implementation=config.attention_implementation, scale=config.attention_scale,
        relative_position=relative, rope_base=config.rope_base, alibi_directional=True, name=name,
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
        encoded: Optional[Array],
        *,
        self_mask: Optional[Array] = None,
        cross_mask: Optional[Array] = None,
        deterministic: bool = True,
        decode: bool = False,
        lengths: Optional[Array] = None,
    ) -> Array:
        """Decodes ``y [..., T, E]`` attending to ``encoded [..., S, E]``.

        Args:
          encoded: the memory; with ``decode`` it may be ``None`` to reuse the
            cross-attention keys/values cached by an earlier decode call that
            passed it (they are projected once per source, not per step).
          self_mask: extra self-attention mask, broadcastable to ``[..., N, T, T]``
            (``[..., N, T, L]`` with ``decode``); causality is always applied.
          cross_mask: broadcastable to ``[..., N, T, S]`` (e.g. source key padding).
          decode: use the self-attention KV cache and the cross-attention memory cache.
          lengths: int ``[...]`` with ``decode``: real new positions per example.
        """
        if encoded is None and not decode:
            raise ValueError("encoded=None is only valid with decode=True (cached cross-attention).")
        attend_self = lambda h: _attention(self.config, "self_attention")(  # noqa: E731
            h, mask=self_mask, is_causal=True, deterministic=deterministic, decode=decode,
            lengths=lengths)
        attend_cross = lambda h: _attention(self.config, "cross_attention", cross=True)(  # noqa: E731
            h, encoded, mask=cross_mask, deterministic=deterministic, decode=decode, static_kv=True)
        y = self.residual(y, attend_self, "self_attention", deterministic)
        y = self.residual(y, attend_cross, "cross_attention", deterministic)
        return self.residual(y, lambda h: self.ffn(h, deterministic), "ffn", deterministic)
