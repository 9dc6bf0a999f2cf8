"""The encoder–decoder Transformer (Vaswani et al. 2017), Flax NNX: twin of :mod:`flax_attention.linen.transformer`.

The same :class:`~flax_attention.TransformerConfig`, the same entry points
(``encode``, ``decode``, ``__call__``) and the same parameter tree as the linen
:class:`flax_attention.Transformer`, so a linen checkpoint (e.g. written by
``train.py``) loads with :func:`~flax_attention.nnx.load_linen_variables` and
gives identical logits. Greedy and beam decoding run the linen search loops
(:mod:`flax_attention.linen.decoding`) on this model's parameters, so translations
are identical too.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from flax_attention.linen import decoding

from flax_attention.functional import kv_cache
from flax_attention.linen.layers import TransformerConfig
from flax_attention.functional.masks import key_mask
from flax_attention.nnx import _cache
from flax_attention.nnx.convert import linen_variables
from flax_attention.nnx.layers import TransformerDecoderLayer, TransformerEncoderLayer, layer_norm
from flax_attention.functional.positions import sinusoidal_encoding
from flax_attention.linen.transformer import Transformer as LinenTransformer

Array = jax.Array


class SinusoidalPositionalEncoding(nnx.Module):
    """Adds sinusoidal encodings (§3.5) to ``x [..., T, E]``.

    With ``decode`` positions continue from a scalar int32 ``position_index``
    (made by :meth:`init_cache`), and from the per-example
    ``position_lengths [...]`` once a call passes ``lengths``: the linen
    module's layout (see :mod:`flax_attention.nnx._cache`).
    """

    def __init__(self):
        self.position_index = nnx.data(None)
        self.position_lengths = nnx.data(None)

    def init_cache(self) -> None:
        self.position_index = nnx.Cache(jnp.array(0, jnp.int32))
        self.position_lengths = nnx.data(None)

    def __call__(self, x: Array, *, decode: bool = False, lengths: Optional[Array] = None) -> Array:
        t, e = x.shape[-2:]
        positions = jnp.arange(t, dtype=jnp.int32)
        if decode:
            if self.position_index is None:
                raise ValueError("decode=True needs the cache: call model.init_cache(batch_size) first.")
            batch = x.shape[:-2]
            lengths = kv_cache.check_lengths(lengths, batch, t)
            start = _cache.fill_levels(self, batch, index="position_index")
            positions = start[..., None] + positions
            _cache.advance(self, start, lengths, t, index="position_index")
        return (x + sinusoidal_encoding(positions, e)).astype(x.dtype)


class _Stack(nnx.Module):
    """``layers_0 .. layers_{n-1}`` (the linen names) and, for pre-LN, ``final_norm``."""

    def _build(self, config, layer_cls, n, rngs):
        self.config, self.num_layers = config, n
        for i in range(n):
            setattr(self, f"layers_{i}", layer_cls(config, rngs=rngs))
        self.final_norm = layer_norm(config, rngs) if config.pre_ln else nnx.data(None)

    def layers(self):
        return [getattr(self, f"layers_{i}") for i in range(self.num_layers)]

    def finish(self, x):
        return x if self.final_norm is None else self.final_norm(x)


class TransformerEncoder(_Stack):
    """``num_encoder_layers`` encoder layers on embedded inputs (no embedding)."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self._build(config, TransformerEncoderLayer, config.num_encoder_layers, rngs)

    def __call__(self, x: Array, mask: Optional[Array] = None, *, deterministic: bool = True) -> Array:
        """``x [..., S, E]`` -> ``[..., S, E]``; ``mask`` broadcastable to ``[..., N, S, S]``."""
        for layer in self.layers():
            x = layer(x, mask, deterministic=deterministic)
        return self.finish(x)


class TransformerDecoder(_Stack):
    """``num_decoder_layers`` decoder layers on embedded targets."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self._build(config, TransformerDecoderLayer, config.num_decoder_layers, rngs)

    def __call__(self, y: Array, encoded: Optional[Array], **kw) -> Array:
        """``y [..., T, E]`` against ``encoded [..., S, E]``; keywords as the decoder layer's."""
        for layer in self.layers():
            y = layer(y, encoded, **kw)
        return self.finish(y)


class Transformer(nnx.Module):
    """Encoder–decoder Transformer with (tied) embeddings scaled by ``√E``; see the module docstring."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        embed = lambda v: nnx.Embed(  # noqa: E731
            v, c.d_model, dtype=c.dtype, param_dtype=c.param_dtype,
            embedding_init=initializers.normal(stddev=c.d_model**-0.5), rngs=rngs)
        if c.share_embeddings:
            self.embedding = embed(c.vocab_size)
        else:
            self.source_embedding = embed(c.vocab_size)
            self.target_embedding = embed(c.target_vocab_size)
        if not c.tie_output:
            self.logits = nnx.Linear(c.d_model, c.target_vocab_size, dtype=c.dtype,
                                     param_dtype=c.param_dtype, rngs=rngs)
        if c.position == "sinusoidal":  # rope/alibi live in the attention layers
            self.positions = SinusoidalPositionalEncoding()
        self.dropout = nnx.Dropout(c.dropout_rate, rngs=rngs if c.dropout_rate > 0 else None)
        self.encoder = TransformerEncoder(c, rngs=rngs)
        self.decoder = TransformerDecoder(c, rngs=rngs)

    def _embedding(self, target: bool) -> nnx.Embed:
        if self.config.share_embeddings:
            return self.embedding
        return self.target_embedding if target else self.source_embedding

    def _embed(self, tokens, target, deterministic, decode=False, lengths=None):
        if tokens.ndim < 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array [..., L], got {tokens.dtype} {tokens.shape}.")
        if tokens.shape[-1] > self.config.max_len:
            raise ValueError(f"sequence length {tokens.shape[-1]} exceeds config.max_len="
                             f"{self.config.max_len}; truncate the inputs or raise max_len.")
        x = self._embedding(target)(tokens) * jnp.asarray(self.config.d_model**0.5, self.config.dtype)
        if self.config.position == "sinusoidal":
            x = self.positions(x, decode=decode, lengths=lengths)
        return self.dropout(x, deterministic=deterministic)  # on embeddings + positions (§5.4)

    def encode(self, src_tokens: Array, *, deterministic: bool = True) -> Array:
        """``src_tokens [B, S]`` (int) -> ``[B, S, E]``; ``pad_id`` keys are masked."""
        x = self._embed(src_tokens, False, deterministic)
        return self.encoder(x, key_mask(src_tokens != self.config.pad_id), deterministic=deterministic)

    def decode(self, tgt_in: Array, encoded: Optional[Array], src_tokens: Array, *,
               deterministic: bool = True, decode: bool = False,
               lengths: Optional[Array] = None) -> Array:
        """Float32 next-token logits ``[B, T, V_out]``, as :meth:`flax_attention.Transformer.decode`.

        With ``decode=True`` (after :meth:`init_cache`) ``tgt_in`` holds the next
        ``T`` positions; the first such call passes ``encoded`` and caches every
        cross-attention's keys/values, later calls may pass ``encoded=None``.
        """
        if encoded is None and not decode:
            raise ValueError("encoded=None needs decode=True and an earlier decode call with encoded.")
        if encoded is not None and encoded.shape[:-1] != src_tokens.shape:
            raise ValueError(f"encoded {encoded.shape} must be [B, S, E] for src_tokens "
                             f"{src_tokens.shape}; pass the same src_tokens that were encoded.")
        cross_mask = key_mask(src_tokens != self.config.pad_id)
        # With a cache, generated tokens are never padding: causality alone (as the linen model).
        self_mask = None if decode else key_mask(tgt_in != self.config.pad_id)
        y = self._embed(tgt_in, True, deterministic, decode, lengths)
        y = self.decoder(y, encoded, self_mask=self_mask, cross_mask=cross_mask,
                         deterministic=deterministic, decode=decode, lengths=lengths)
        if self.config.tie_output:
            logits = self._embedding(True).attend(y)
        else:
            logits = self.logits(y)
        return logits.astype(jnp.float32)

    def __call__(self, src_tokens: Array, tgt_in: Array, *, deterministic: bool = True) -> Array:
        """Teacher-forced float32 logits ``[B, T, V_out]``."""
        encoded = self.encode(src_tokens, deterministic=deterministic)
        return self.decode(tgt_in, encoded, src_tokens, deterministic=deterministic)

    def init_cache(self, batch_size: int, max_len: Optional[int] = None, dtype=jnp.float32) -> None:
        """Allocates every decoder self-attention cache (``[B, L, K, H]``, scalar index 0) and the
        position index, as :func:`flax_attention.init_cache` does for the linen model; forgets
        any cached cross-attention memory. ``max_len`` defaults to ``config.max_len``."""
        max_len = self.config.max_len if max_len is None else int(max_len)
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"batch_size ({batch_size}) and max_len ({max_len}) must be positive.")
        for layer in self.decoder.layers():
            layer.self_attention.init_cache((batch_size, max_len, self.config.d_model), dtype)
            layer.cross_attention.cached_key = nnx.data(None)
            layer.cross_attention.cached_value = nnx.data(None)
        if self.config.position == "sinusoidal":
            self.positions.init_cache()


def linen_twin(model: Transformer) -> LinenTransformer:
    """The linen :class:`flax_attention.Transformer` with ``model``'s configuration."""
    return LinenTransformer(model.config)


def greedy_decode(model: Transformer, src: Array, **kw) -> Array:
    """:func:`flax_attention.greedy_decode` on the NNX model (same arguments after ``src``)."""
    return decoding.greedy_decode(linen_twin(model), linen_variables(model)["params"], src, **kw)


def beam_search(model: Transformer, src: Array, **kw):
    """:func:`flax_attention.beam_search` on the NNX model (same arguments after ``src``)."""
    return decoding.beam_search(linen_twin(model), linen_variables(model)["params"], src, **kw)
