"""Transformer-encoder text classifier (drop-in for the BiGRU IMDB model).

``Embed(V, E)·√E + sinusoidal positions -> Dropout -> N encoder layers ->
pooling -> Dropout -> Dense(1)``.

Same interface as :class:`~flax_attention.models.bigru.BiGRUClassifier`:
``model.apply(vars, tokens [B, S], lengths [B], train=...) -> (logits [B],
weights [B, S])``; padding is taken from ``lengths`` (as a key mask in every
layer and in the pooling), so what is stored at padded positions never
changes a logit.

Pooling (``pooling``):

* ``"mean"``: masked mean of the encoder outputs over the real tokens;
  ``weights`` = ``1 / length`` on real tokens.
* ``"attention"``: learned context-vector attention pooling
  (:class:`~flax_attention.AdditiveAttention`, as the BiGRU model);
  ``weights`` = its attention weights.
* ``"cls"``: a learned vector is prepended at position 0 and its final state
  is classified (BERT style); it is not a pooling over tokens, so ``weights``
  is all zeros. ``max_len`` must leave room for it (``S + 1``).
* ``"concat"``: ULMFiT's concat pooling (:func:`concat_pool`): the last real
  token's state, the masked max and the masked mean side by side (``3E``
  features); ``weights`` are the mean's.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import flax.linen as nn
from flax.linen.linear import default_kernel_init
import jax.numpy as jnp

from flax_attention.linen.additive import AdditiveAttention
from flax_attention.linen.layers import SinusoidalPositionalEncoding, TransformerConfig
from flax_attention.functional.masks import key_mask, padding_mask
from flax_attention.linen.partitioning import logical
from flax_attention.linen.transformer import TransformerEncoder
from flax_attention.models.lm import LanguageModel, LMConfig

Array = jnp.ndarray

POOLINGS = ("mean", "attention", "cls", "concat")
LM_POOLINGS = ("mean", "concat")  # the poolings over a pretrained LM's states (LMClassifier)


@dataclasses.dataclass(frozen=True)
class TransformerClassifierConfig:
    """Transformer classifier hyper-parameters (defaults: the suggested IMDB config).

    Attributes:
      vocab_size: ``V`` (id 0 is padding).
      d_model: ``E``. num_heads: ``N``. num_kv_heads: ``K`` (``0`` = ``N``, plain
        multi-head; an int, not ``None``, so it maps onto a ``train.py`` flag).
      d_ff: ``F``. num_layers: encoder layers.
      dropout_rate: embedding, residual and head dropout.
      attention_dropout_rate: dropout on attention weights.
      max_len: longest input (``S``, plus 1 with ``cls`` pooling).
      pooling: ``"mean"``, ``"attention"``, ``"cls"`` or ``"concat"``.
      attention_size: ``A`` of the ``"attention"`` pooling.
      pre_ln: pre-LN encoder layers (stable with a plain warm-up; the paper is post-LN).
      lm_dropout_rate: only with ``train.py --init_from``: embedding and residual
        dropout inside the pretrained LM's blocks while fine-tuning (the encoder
        above uses ``dropout_rate``; the LM's own rate is its pretraining's).
      lm_lr_decay: only with ``train.py --init_from``: discriminative fine-tuning
        (Howard & Ruder 2018, eq. 2): the head and final norm learn at the
        run's rate, each block below at ``1 / lm_lr_decay`` of the one above,
        the embedding below the lowest block (``1.0`` = one rate; ULMFiT uses 2.6).
    """

    vocab_size: int = 10_000
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int = 0
    d_ff: int = 512
    num_layers: int = 2
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    max_len: int = 512
    pooling: str = "mean"
    attention_size: int = 64
    pre_ln: bool = True
    lm_dropout_rate: float = 0.0
    lm_lr_decay: float = 1.0

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} must be one of {POOLINGS}.")
        if self.num_layers < 1 or self.attention_size < 1:
            raise ValueError(f"num_layers ({self.num_layers}) and attention_size must be >= 1.")
        if not 0.0 <= self.lm_dropout_rate < 1.0:
            raise ValueError(f"lm_dropout_rate={self.lm_dropout_rate} must be in [0, 1).")
        if not self.lm_lr_decay >= 1.0:
            raise ValueError(f"lm_lr_decay={self.lm_lr_decay} must be >= 1 (1 = one rate for every layer; "
                             "ULMFiT uses 2.6).")
        self.encoder_config()  # validates heads, dropout, sizes

    def encoder_config(self) -> TransformerConfig:
        """The :class:`~flax_attention.linen.layers.TransformerConfig` of the encoder stack."""
        return TransformerConfig(
            vocab_size=self.vocab_size, d_model=self.d_model, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads or None, d_ff=self.d_ff, num_encoder_layers=self.num_layers,
            num_decoder_layers=0, dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate, max_len=self.max_len,
            pre_ln=self.pre_ln,
        )


def mean_pool(h: Array, lengths: Array) -> Tuple[Array, Array]:
    """``(pooled [B, E] float32, weights [B, S])``: the mean of ``h [B, S, E]`` over the first ``lengths`` tokens."""
    weights = padding_mask(lengths, h.shape[1]) / jnp.maximum(lengths, 1)[:, None].astype(jnp.float32)
    return jnp.einsum("bs,bse->be", weights, h.astype(jnp.float32)), weights


def concat_pool(h: Array, lengths: Array) -> Tuple[Array, Array]:
    """ULMFiT's concat pooling (Howard & Ruder 2018, sec. 3.3): ``[h_last, max(H), mean(H)]`` over the real tokens.

    Args:
      h: ``[B, S, E]`` states, padding after ``lengths``.
      lengths: int ``[B]`` true lengths (a row of length 0 pools to zeros).

    Returns:
      ``(pooled [B, 3E] float32, weights [B, S])``; ``weights`` are the mean's.
    """
    mean, weights = mean_pool(h, lengths)
    h = h.astype(jnp.float32)
    nonempty = lengths[:, None] > 0
    # -inf at padding (not a large finite value): a padded state can never be the max.
    top = jnp.max(jnp.where((weights > 0)[..., None], h, -jnp.inf), axis=1)
    last = jnp.take_along_axis(h, (jnp.maximum(lengths, 1) - 1)[:, None, None], axis=1)[:, 0]
    return jnp.where(nonempty, jnp.concatenate([last, top, mean], axis=-1), 0.0), weights


class TransformerClassifier(nn.Module):
    """Embedding + sinusoidal positions + Transformer encoder + pooling + one logit.

    Attributes:
      config: the hyper-parameters (saved with a trained model).
      attention_implementation: overrides the encoder's attention kernel (see
        :class:`~flax_attention.linen.layers.TransformerConfig`), e.g. the trainer's
        ``"context_parallel"`` on a mesh with a ``seq`` axis; the parameters
        do not change.
    """

    config: TransformerClassifierConfig
    attention_implementation: Optional[str] = None

    @nn.compact
    def __call__(self, tokens: Array, lengths: Array, *, train: bool = False) -> Tuple[Array, Array]:
        """Classifies padded token sequences.

        Args:
          tokens: int ``[B, S]``, padding after the real tokens.
          lengths: int ``[B]`` true lengths (>= 1).
          train: enables dropout (needs a ``"dropout"`` RNG).

        Returns:
          ``(logits [B], weights [B, S])``; see the module docstring for
          ``weights`` per pooling.
        """
        cfg = self.config
        b, s = tokens.shape
        extra = 1 if cfg.pooling == "cls" else 0
        if s + extra > cfg.max_len:
            raise ValueError(f"input length {s}{' + 1 (cls)' if extra else ''} exceeds max_len="
                             f"{cfg.max_len}; raise TransformerClassifierConfig.max_len.")
        real = padding_mask(lengths, s)  # [B, S]
        x = nn.Embed(cfg.vocab_size, cfg.d_model, name="embed",
                     embedding_init=logical(nn.initializers.normal(cfg.d_model**-0.5), ("vocab", "embed")))(tokens)
        x = x * jnp.float32(cfg.d_model**0.5)  # unit-scale embeddings, as in the Transformer
        if extra:
            cls = self.param("cls", logical(nn.initializers.normal(1.0), ("embed",)), (cfg.d_model,))
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, cfg.d_model)), x], axis=1)
            real = jnp.concatenate([jnp.ones((b, 1), bool), real], axis=1)
        x = SinusoidalPositionalEncoding(name="positions")(x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)
        encoder = dataclasses.replace(cfg.encoder_config(), attention_implementation=self.attention_implementation)
        h = TransformerEncoder(encoder, name="encoder")(
            x, key_mask(real), deterministic=not train)

        if cfg.pooling == "cls":
            pooled, weights = h[:, 0], jnp.zeros((b, s), jnp.float32)
        elif cfg.pooling == "attention":
            pooled, weights = AdditiveAttention(cfg.attention_size, name="pool")(h, real)
        else:
            pooled, weights = (concat_pool if cfg.pooling == "concat" else mean_pool)(h, lengths)
        pooled = nn.Dropout(cfg.dropout_rate)(pooled, deterministic=not train)
        head = nn.Dense(1, name="head", kernel_init=logical(default_kernel_init, ("embed", None)))
        return head(pooled)[..., 0], weights


class LMClassifier(nn.Module):
    """A pretrained decoder-only LM's blocks + mean or concat pooling + one logit (``train.py --init_from``).

    The body is :class:`~flax_attention.models.lm.LanguageModel` (parameters
    under ``lm``, the same tree as the LM's own, so an ``lm`` workdir's
    parameters drop in); its final-normed hidden states (causal attention,
    RoPE positions, padding after ``lengths`` as segment 0) are pooled over
    the real tokens (``"mean"``, or ``"concat"``: :func:`concat_pool`, whose
    last state is the only one that has read the whole review), then
    ``Dropout -> Dense(1)`` (``head``). A causal body is
    kept as pretrained (Howard & Ruder 2018; Dai & Le 2015 fine-tune their LM
    as it is). Same interface as :class:`TransformerClassifier`.

    Attributes:
      config: the language model's :class:`~flax_attention.models.lm.LMConfig`.
      dropout_rate: dropout on the pooled vector (the body uses ``config.dropout_rate``).
      pooling: ``"mean"`` or ``"concat"``.
    """

    config: LMConfig
    dropout_rate: float = 0.1
    pooling: str = "mean"

    @nn.compact
    def __call__(self, tokens: Array, lengths: Array, *, train: bool = False) -> Tuple[Array, Array]:
        """``(logits [B], weights [B, S])`` for ``tokens [B, S]`` with true ``lengths [B]`` (>= 1)."""
        h = LanguageModel(self.config, name="lm").hidden(tokens, lengths=lengths, train=train)
        if self.pooling not in LM_POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} must be one of {LM_POOLINGS} on a pretrained LM.")
        pooled, weights = (concat_pool if self.pooling == "concat" else mean_pool)(h, lengths)
        pooled = nn.Dropout(self.dropout_rate)(pooled, deterministic=not train)
        head = nn.Dense(1, name="head", kernel_init=logical(default_kernel_init, ("embed", None)))
        return head(pooled)[..., 0], weights
