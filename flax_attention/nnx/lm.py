"""Decoder-only language model, Flax NNX: twin of :class:`flax_attention.models.lm.LanguageModel`.

Built from the same configuration (:class:`flax_attention.models.lm.LMConfig`;
read by field name, not imported: imports run models -> nnx), with the same
parameter tree (``embedding``, ``layers_{i}/{self_attention_norm,
self_attention, ffn_norm, ffn}``, ``final_norm``, ``logits`` when untied) and
the same decoding cache, so :func:`~flax_attention.nnx.load_linen_variables`
loads a linen checkpoint (e.g. one ``train.py --model lm`` wrote) and the logits
are identical. For sampled generation, move the weights back with
:func:`~flax_attention.nnx.linen_variables` and call
:func:`flax_attention.linen.generation.generate` on the linen model.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from flax_attention.functional import lm_inputs
from flax_attention.linen.layers import ACTIVATIONS
from flax_attention.nnx.layers import PositionwiseFeedForward
from flax_attention.nnx.multihead import MultiHeadAttention

Array = jax.Array


def _norm(config, rngs: nnx.Rngs) -> nnx.Module:
    cls = nnx.RMSNorm if config.norm == "rms" else nnx.LayerNorm
    return cls(config.d_model, epsilon=config.norm_epsilon, dtype=jnp.dtype(config.dtype), rngs=rngs)


class DecoderBlock(nnx.Module):
    """One pre-norm block, ``x + Attn(Norm(x))`` then ``x + FFN(Norm(x))``; twin of the linen block."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        c, dtype = config, jnp.dtype(config.dtype)
        self.self_attention_norm = _norm(c, rngs)
        self.self_attention = MultiHeadAttention(
            c.num_heads, c.d_model, num_kv_heads=c.num_kv_heads or c.num_heads,
            dropout_rate=c.attention_dropout_rate, use_bias=c.use_bias, dtype=dtype,
            kernel_init=initializers.xavier_uniform(), window=c.window or None,
            implementation=c.attention_implementation or None,
            relative_position=None if c.relative_position == "none" else c.relative_position,
            rope_base=c.rope_base, decode=False, rngs=rngs)
        self.ffn_norm = _norm(c, rngs)
        self.ffn = PositionwiseFeedForward(c.d_model, c.d_ff, activation=ACTIVATIONS[c.activation], dtype=dtype,
                                           rngs=rngs)
        self.dropout = nnx.Dropout(c.dropout_rate, rngs=rngs if c.dropout_rate > 0 else None)

    def __call__(self, x: Array, *, mask: Optional[Array], positions: Optional[Array], deterministic: bool,
                 decode: bool, lengths: Optional[Array], rngs=None) -> Array:
        """``x [B, T, E] -> [B, T, E]``; ``mask`` broadcastable to ``[B, N, T, T]`` (decode: ``[B, N, T, L]``)."""
        h = self.self_attention(self.self_attention_norm(x), mask=mask, is_causal=True,
                                deterministic=deterministic, decode=decode, positions=positions,
                                lengths=lengths, rngs=rngs)
        x = x + self.dropout(h, deterministic=deterministic, rngs=rngs)
        return x + self.dropout(self.ffn(self.ffn_norm(x)), deterministic=deterministic, rngs=rngs)


class LanguageModel(nnx.Module):
    """Decoder-only Transformer LM, NNX; calls as the linen :class:`~flax_attention.models.lm.LanguageModel`.

    Args:
      config: an :class:`~flax_attention.models.lm.LMConfig`.
      rngs: parameter keys (and the dropout stream when ``dropout_rate > 0``).
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.num_layers = c.num_layers
        self.embedding = nnx.Embed(c.vocab_size, c.d_model, dtype=jnp.dtype(c.dtype), rngs=rngs,
                                   embedding_init=initializers.normal(stddev=c.d_model**-0.5))
        for i in range(c.num_layers):  # the linen names layers_{i}
            setattr(self, f"layers_{i}", DecoderBlock(c, rngs=rngs))
        self.final_norm = _norm(c, rngs)
        self.dropout = nnx.Dropout(c.dropout_rate, rngs=rngs if c.dropout_rate > 0 else None)
        if not c.tie_embeddings:
            self.logits = nnx.Linear(c.d_model, c.vocab_size, use_bias=False, rngs=rngs)

    def layers(self):
        return [getattr(self, f"layers_{i}") for i in range(self.num_layers)]

    def init_cache(self, batch_size: int, max_length: Optional[int] = None, dtype: Any = None) -> None:
        """Allocates every layer's decoding cache for ``batch_size`` rows of ``max_length`` tokens
        (default ``config.max_length``), in ``dtype`` (default ``config.dtype``: the linen cache's)."""
        c = self.config
        max_length = c.max_length if max_length is None else int(max_length)
        if batch_size < 1 or not 1 <= max_length <= c.max_length:
            raise ValueError(f"batch_size ({batch_size}) must be >= 1 and max_length ({max_length}) in "
                             f"[1, LMConfig.max_length={c.max_length}].")
        dtype = jnp.dtype(c.dtype) if dtype is None else dtype
        for layer in self.layers():
            layer.self_attention.init_cache((batch_size, max_length, c.d_model), dtype)

    def hidden(self, tokens: Array, *, positions: Optional[Array] = None, segment_ids: Optional[Array] = None,
               train: bool = False, decode: bool = False, lengths: Optional[Array] = None, rngs=None) -> Array:
        """Final-normed hidden states ``[B, T, E]``; arguments as :meth:`__call__`."""
        c = self.config
        lm_inputs.check_tokens(tokens, c.vocab_size, c.max_length)
        b, t = tokens.shape
        mask, lengths = lm_inputs.call_mask((b, t), decode, positions, segment_ids, lengths)
        dtype = jnp.dtype(c.dtype)
        valid = lm_inputs.valid_tokens(tokens, c.vocab_size)
        x = self.embedding(tokens) * jnp.asarray(c.d_model**0.5, dtype)
        x = jnp.where(valid[..., None], x, jnp.nan).astype(dtype)
        x = self.dropout(x, deterministic=not train, rngs=rngs)
        for layer in self.layers():
            x = layer(x, mask=mask, positions=positions, deterministic=not train, decode=decode, lengths=lengths,
                      rngs=rngs)
        return self.final_norm(x)

    def __call__(self, tokens: Array, *, positions: Optional[Array] = None, segment_ids: Optional[Array] = None,
                 train: bool = False, decode: bool = False, lengths: Optional[Array] = None,
                 logits_at: Optional[Array] = None, rngs=None) -> Array:
        """Float32 next-token logits ``[B, T, V]`` (``[B, 1, V]`` with ``logits_at``).

        Arguments as the linen model's (``decode`` needs :meth:`init_cache` first);
        ``rngs``: the dropout stream when ``train`` (default: the module's own).
        """
        h = self.hidden(tokens, positions=positions, segment_ids=segment_ids, train=train, decode=decode,
                        lengths=lengths, rngs=rngs)
        h = lm_inputs.rows_at(h, logits_at)
        if self.config.tie_embeddings:
            return jnp.einsum("bte,ve->btv", h.astype(jnp.float32),
                              jnp.asarray(self.embedding.embedding[...], jnp.float32))
        return self.logits(h.astype(jnp.float32)).astype(jnp.float32)
