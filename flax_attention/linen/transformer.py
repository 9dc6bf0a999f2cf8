"""The encoder–decoder Transformer of Vaswani et al. (2017).

``Transformer(config)`` exposes three entry points (all take
``deterministic``; dropout needs ``rngs={'dropout': key}`` when it is False):

* ``encode(src [B, S]) -> [B, S, E]``; source padding (``pad_id``) is masked
  as keys.
* ``decode(tgt_in [B, T], encoded, src, decode=False) -> [B, T, V_out]``
  float32 logits; causal self-attention, source padding masked in
  cross-attention. With ``decode=True`` the ``"cache"`` collection is read and
  updated (apply with ``mutable=['cache']``) and positions continue from the
  cache index (each example's, after a ragged prefill): prefill a
  (right-padded) prompt with its ``lengths``, then feed one token at a time. The first decode call passes ``encoded`` and
  caches every cross-attention's keys/values; later calls may pass
  ``encoded=None`` to reuse them (passing it again recomputes them). Jit such
  a step with ``donate_argnums`` on the cache: the unchanged memory is then
  aliased, not copied into the returned cache at every step.
* ``__call__(src, tgt_in)`` = ``decode(tgt_in, encode(src), src)`` (teacher
  forcing).

Create an empty decoding cache with :func:`init_cache`.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
from flax.linen.linear import default_kernel_init
import jax
import jax.numpy as jnp

from flax_attention.linen.layers import (
    SinusoidalPositionalEncoding,
    TransformerConfig,
    TransformerDecoderLayer,
    TransformerEncoderLayer,
)
from flax_attention.functional.masks import key_mask
from flax_attention.linen.partitioning import logical

Array = jnp.ndarray


def _final_norm(config: TransformerConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=config.dtype,
                        param_dtype=config.param_dtype, name=name)


class TransformerEncoder(nn.Module):
    """A stack of ``num_encoder_layers`` encoder layers on embedded inputs.

    Usable alone (e.g. by a classifier): it adds no embedding or position
    encoding; pre-LN stacks end with a LayerNorm.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array] = None, *, deterministic: bool = True) -> Array:
        """Encodes ``x [..., S, E]``.

        Args:
          x: embedded inputs ``[..., S, E]``.
          mask: boolean, broadcastable to ``[..., N, S, S]``, e.g.
            ``key_mask(tokens != pad_id)`` (``[..., 1, 1, S]``).
          deterministic: disables dropout.

        Returns:
          ``[..., S, E]``.
        """
        for i in range(self.config.num_encoder_layers):
            x = TransformerEncoderLayer(self.config, name=f"layers_{i}")(
                x, mask, deterministic=deterministic)
        return _final_norm(self.config, "final_norm")(x) if self.config.pre_ln else x


class TransformerDecoder(nn.Module):
    """A stack of ``num_decoder_layers`` decoder layers on embedded targets."""

    config: TransformerConfig

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
        """Decodes ``y [..., T, E]`` against ``encoded [..., S, E]`` -> ``[..., T, E]``.

        Self-attention is causal; ``encoded``, ``self_mask``, ``cross_mask`` and
        ``lengths`` as in :class:`~flax_attention.TransformerDecoderLayer`.
        """
        for i in range(self.config.num_decoder_layers):
            y = TransformerDecoderLayer(self.config, name=f"layers_{i}")(
                y, encoded, self_mask=self_mask, cross_mask=cross_mask,
                deterministic=deterministic, decode=decode, lengths=lengths)
        return _final_norm(self.config, "final_norm")(y) if self.config.pre_ln else y


class Transformer(nn.Module):
    """Encoder–decoder Transformer with (tied) embeddings and ``config.position`` positions.

    Embeddings are multiplied by ``√E`` (§3.4) and initialised with standard
    deviation ``E^-1/2``, so embedded inputs have unit scale and tied output
    logits start near unit variance.
    """

    config: TransformerConfig

    def setup(self):
        c = self.config
        embed = lambda v, name: nn.Embed(  # noqa: E731
            v, c.d_model, dtype=c.dtype, param_dtype=c.param_dtype,
            embedding_init=logical(nn.initializers.normal(stddev=c.d_model**-0.5), ("vocab", "embed")), name=name)
        if c.share_embeddings:
            self.source_embedding = self.target_embedding = embed(c.vocab_size, "embedding")
        else:
            self.source_embedding = embed(c.vocab_size, "source_embedding")
            self.target_embedding = embed(c.target_vocab_size, "target_embedding")
        if not c.tie_output:
            self.output_projection = nn.Dense(
                c.target_vocab_size, dtype=c.dtype, param_dtype=c.param_dtype, name="logits",
                kernel_init=logical(default_kernel_init, ("embed", "vocab")),
                bias_init=logical(nn.initializers.zeros_init(), ("vocab",)))
        if c.position == "sinusoidal":  # rope/alibi live in the attention layers
            self.positions = SinusoidalPositionalEncoding()
        self.dropout = nn.Dropout(c.dropout_rate)
        self.encoder = TransformerEncoder(c)
        self.decoder = TransformerDecoder(c)

    def _embed(self, embedding: nn.Embed, tokens: Array, deterministic: bool, decode: bool = False,
               lengths: Optional[Array] = None):
        if tokens.ndim < 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array [..., L], got {tokens.dtype} {tokens.shape}.")
        if tokens.shape[-1] > self.config.max_len:
            raise ValueError(
                f"sequence length {tokens.shape[-1]} exceeds config.max_len={self.config.max_len}; "
                "truncate the inputs or raise max_len.")
        x = embedding(tokens) * jnp.asarray(self.config.d_model**0.5, self.config.dtype)
        if self.config.position == "sinusoidal":
            x = self.positions(x, decode=decode, lengths=lengths)
        # Dropout on the sum of embeddings and positional encodings (§5.4).
        return self.dropout(x, deterministic=deterministic)

    def encode(self, src_tokens: Array, *, deterministic: bool = True) -> Array:
        """Encodes ``src_tokens [B, S]`` (int) -> ``[B, S, E]``; ``pad_id`` keys are masked."""
        mask = key_mask(src_tokens != self.config.pad_id)
        x = self._embed(self.source_embedding, src_tokens, deterministic)
        return self.encoder(x, mask, deterministic=deterministic)

    def decode(
        self,
        tgt_in: Array,
        encoded: Optional[Array],
        src_tokens: Array,
        *,
        deterministic: bool = True,
        decode: bool = False,
        lengths: Optional[Array] = None,
    ) -> Array:
        """Next-token logits for the decoder inputs.

        Args:
          tgt_in: int ``[B, T]``, starting with a BOS id ``!= pad_id``.
          encoded: ``[B, S, E]`` from :meth:`encode`; with ``decode`` it may
            be ``None`` after a first decode call that passed it (the
            cross-attention keys/values cached then are reused).
          src_tokens: int ``[B, S]``; its padding is masked in cross-attention.
          deterministic: disables dropout.
          decode: incremental decoding with the ``"cache"`` collection (apply
            with ``mutable=['cache']``): ``tgt_in`` holds the next ``T``
            positions (a prompt, then one token per call). Prompts of
            different lengths are right-padded and given ``lengths``; the
            logits at padding positions are meaningless.
          lengths: int ``[B]`` with ``decode``: real tokens of ``tgt_in`` per
            example (default ``T``); each example's cache advances by its own.

        Returns:
          float32 logits ``[B, T, V_out]``.
        """
        if encoded is None and not decode:
            raise ValueError("encoded=None needs decode=True and an earlier decode call with encoded.")
        if encoded is not None and encoded.shape[:-1] != src_tokens.shape:
            raise ValueError(
                f"encoded {encoded.shape} must be [B, S, E] for src_tokens {src_tokens.shape}; "
                "pass the same src_tokens that were encoded.")
        cross_mask = key_mask(src_tokens != self.config.pad_id)
        # Teacher forcing: pad keys are masked (causality is added by the layers).
        # With a cache the mask would have to cover all L cached slots, and
        # generated tokens are never padding, so causality alone is used.
        self_mask = None if decode else key_mask(tgt_in != self.config.pad_id)
        y = self._embed(self.target_embedding, tgt_in, deterministic, decode, lengths)
        y = self.decoder(y, encoded, self_mask=self_mask, cross_mask=cross_mask,
                         deterministic=deterministic, decode=decode, lengths=lengths)
        if self.config.tie_output:
            logits = self.target_embedding.attend(y)
        else:
            logits = self.output_projection(y)
        return logits.astype(jnp.float32)

    def __call__(
        self, src_tokens: Array, tgt_in: Array, *, deterministic: bool = True, decode: bool = False
    ) -> Array:
        """Teacher-forced logits ``[B, T, V_out]`` (float32) for ``src [B, S]`` and ``tgt_in [B, T]``.

        ``model.init(rng, src, tgt_of_max_len, decode=True)['cache']`` allocates
        the decoding cache (see :func:`init_cache`).
        """
        encoded = self.encode(src_tokens, deterministic=deterministic)
        return self.decode(tgt_in, encoded, src_tokens, deterministic=deterministic, decode=decode)


def init_cache(model: Transformer, batch_size: int, max_len: Optional[int] = None):
    """An empty decoding cache for ``model`` (all zeros, index 0), without running the model.

    Args:
      model: a :class:`Transformer`.
      batch_size: ``B``.
      max_len: total number of target positions to decode (prompt included);
        defaults to ``model.config.max_len``.

    Returns:
      The ``"cache"`` collection: pass ``{'params': params, 'cache': cache}`` to
      ``model.apply(..., decode=True, mutable=['cache'], method=Transformer.decode)``.
      Every self-attention holds flax's cache (``cached_key``/``cached_value
      [B, L, K, H]``, a scalar ``cache_index``) and, for sinusoidal
      positions, ``positions`` holds a scalar ``position_index``; a decode
      call with ``lengths`` adds the per-example ``cache_lengths`` /
      ``position_lengths [B]`` (:mod:`flax_attention.functional.kv_cache`). The
      cross-attention memory is added by the first decode call that passes
      ``encoded`` (its length ``S`` is not known here).
    """
    max_len = model.config.max_len if max_len is None else int(max_len)
    if batch_size <= 0 or max_len <= 0:
        raise ValueError(f"batch_size ({batch_size}) and max_len ({max_len}) must be positive.")
    src = jnp.ones((batch_size, 1), jnp.int32)
    tgt = jnp.ones((batch_size, max_len), jnp.int32)
    # Only shapes are needed (every cache entry starts at zero), so trace, don't run.
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), src, tgt, decode=True))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
