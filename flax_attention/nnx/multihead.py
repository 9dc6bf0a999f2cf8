"""Multi-head attention as a thin Flax NNX module over the pure functions.

:class:`MultiHeadAttention` is a drop-in for :class:`flax.nnx.MultiHeadAttention`
(it subclasses it): the same constructor, call signature, parameter tree
(``query``/``key``/``value``/``out`` :class:`~flax.nnx.LinearGeneral` with
``kernel``/``bias``, ``query_ln``/``key_ln`` with ``normalize_qk``), the same
``init_cache`` and cache variables (``cached_key``/``cached_value [..., L, K,
H]``, scalar int32 ``cache_index``; after a ragged prefill also the linen
module's per-example ``cache_lengths``, see :mod:`flax_attention.nnx._cache`)
and ``nnx.view``/``set_view``. Only the attention itself differs: it is
:func:`flax_attention.scaled_dot_product_attention`
(or a custom ``attention_fn``), RoPE/ALiBi come from
:mod:`flax_attention.functional.positions` and the cache writes from
:mod:`flax_attention.functional.kv_cache`, as in the linen
:class:`flax_attention.MultiHeadAttention`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attention.functional import kv_cache
from flax_attention.functional.kv_cache import DecodeMode as Mode
from flax_attention.functional.context_parallel import routed_attention
from flax_attention.functional.custom_attention import call_attention_fn
from flax_attention.functional.masks import combine_masks
from flax_attention.nnx import _cache
from flax_attention.functional.positions import alibi_bias, alibi_slopes, apply_rotary

Array = jax.Array
RELATIVE_POSITIONS = (None, "rope", "alibi")


class MultiHeadAttention(nnx.MultiHeadAttention):
    """Multi-head (and grouped-/multi-query) dot-product attention, Flax NNX.

    Constructed and called like :class:`flax.nnx.MultiHeadAttention` (every
    constructor argument of flax's is accepted and means the same, see its
    docs); from the same parameters it returns flax's outputs except where
    this package's guarantees differ on purpose:

    * A query row with nothing to attend to (fully masked) outputs zeros with
      finite gradients; flax returns the mean of the values.
    * Logits and softmax are computed in float32 (float64 for float64
      inputs) whatever ``dtype`` is; flax computes them in ``dtype``.
    * ``attention_fn=None`` (the default) means
      :func:`~flax_attention.scaled_dot_product_attention`. A custom function
      is called like flax calls it (``nnx.dot_product_attention`` reproduces
      flax exactly), with only the keyword arguments it names.
    * ``broadcast_dropout=None`` (the default) means the attention function's
      own default: one dropout draw per weight for ours, flax's ``True`` for
      flax's functions. ``True`` with the default function is a ValueError
      (it cannot share the dropout mask across batch dims).
    * ``decode`` unset both in the constructor and the call means ``False``
      (flax raises).
    * Decoding (``decode=True``) accepts ``T >= 1`` new tokens per call (a
      prompt prefill, causal within the block; flax takes exactly one), is
      always causal (flax passes ``is_causal`` on, which with ``T=1`` against
      the cache hides every key but the first), and a write past the cache
      length raises a ValueError when the index is concrete; under ``jit`` the
      cache is left intact and that example's output is NaN, on this step and
      every later one (flax's clamped write overwrites the last slot).
    * ``is_causal`` with ``T != S`` aligns the diagonal bottom-right (flax:
      top-left); ``causal_alignment="top_left"`` gives flax's.

    Extra constructor options (keyword-only), besides flax's:

    Args:
      implementation: ``None`` (auto), ``"dense"``, ``"chunked"`` or a fused
        kernel, see :func:`~flax_attention.scaled_dot_product_attention`.
      window: sliding window ``w`` or ``(left, right)`` (also while decoding).
      scale: logit scale; ``None`` = ``1/√H``.
      causal_alignment: where ``is_causal`` puts the diagonal when ``T != S``:
        ``"bottom_right"`` (default: the queries are the last ``T`` positions,
        as everywhere in this package) or ``"top_left"`` (flax's; query ``i``
        sees keys ``<= i``). Ignored while decoding (positions are absolute).
      relative_position: ``None``, ``"rope"`` or ``"alibi"`` (self-attention).
      rope_base: RoPE frequency base.
      alibi_directional: keys right of the query use the slopes in reversed
        head order (bidirectional ALiBi can then tell left from right).

    Extra call arguments: ``bias`` (float logit bias ``[..., N, T, S]``),
    ``positions`` (int ``[..., T]``, RoPE/ALiBi positions without decode),
    ``lengths`` (int ``[...]``, real tokens per example of a right-padded
    prefill: adds the per-example ``cache_lengths [...]`` that positions are
    read from afterwards, as the linen module does) and
    ``static_kv`` (with ``decode``: cross-attention memory projected once, kept
    in ``cached_key``/``cached_value [..., S, K, H]`` and reused by calls
    that pass ``inputs_k=None``).
    """

    def __init__(self, num_heads: int, in_features: int, qkv_features: Optional[int] = None,
                 out_features: Optional[int] = None, num_kv_heads: Optional[int] = None,
                 in_kv_features: Optional[int] = None, *, rngs: nnx.Rngs,
                 attention_fn: Optional[Callable[..., Array]] = None,
                 broadcast_dropout: Optional[bool] = None,
                 implementation: Optional[str] = None, window: Any = None,
                 scale: Optional[float] = None, causal_alignment: str = "bottom_right",
                 relative_position: Optional[str] = None, rope_base: float = 10000.0,
                 alibi_directional: bool = False, **kwargs):
        if relative_position not in RELATIVE_POSITIONS:
            raise ValueError(f"relative_position must be one of {RELATIVE_POSITIONS}, "
                             f"got {relative_position!r}.")
        if broadcast_dropout and attention_fn is None and kwargs.get("dropout_rate", 0.0) > 0.0:
            raise ValueError(
                "broadcast_dropout=True needs a custom attention_fn that supports it (e.g. "
                "nnx.dot_product_attention); the default draws one dropout mask element per weight, "
                "so leave broadcast_dropout unset.")
        # flax types both as non-optional; here None means "our functions" / "the function's
        # default", and flax's __init__ only stores them (our __call__ reads them).
        super().__init__(num_heads, in_features, qkv_features, out_features, num_kv_heads,
                         in_kv_features, rngs=rngs,
                         attention_fn=attention_fn,  # type: ignore[arg-type]
                         broadcast_dropout=broadcast_dropout,  # type: ignore[arg-type]
                         **kwargs)
        if relative_position == "rope" and self.head_dim % 2:
            raise ValueError(f"relative_position='rope' needs an even head dim, got {self.head_dim}.")
        self.implementation = implementation
        self.window = tuple(window) if isinstance(window, list) else window
        self.scale = scale
        self.causal_alignment = causal_alignment
        self.relative_position = relative_position
        self.rope_base = rope_base
        self.alibi_directional = alibi_directional
        self.cache_lengths = nnx.data(None)  # per-example fill levels, after a ragged prefill

    def init_cache(self, input_shape, dtype: Any = jnp.float32):
        """Allocates an empty decoding cache for inputs ``[..., L, E]`` (flax's: ``L`` is its length).

        ``cached_key``/``cached_value`` ``[..., L, K, H]`` in ``dtype`` and a
        scalar int32 ``cache_index``; any earlier ``cache_lengths`` is dropped.
        """
        super().init_cache(input_shape, dtype)
        self.cache_lengths = nnx.data(None)

    def __call__(self, inputs_q: Array, inputs_k: Optional[Array] = None,
                 inputs_v: Optional[Array] = None, *, mask: Optional[Array] = None,
                 deterministic: Optional[bool] = None, rngs=None, sow_weights: bool = False,
                 decode: Optional[bool] = None, is_causal: bool = False, out_sharding=None,
                 qkv_sharding=None, bias: Optional[Array] = None,
                 positions: Optional[Array] = None, lengths: Optional[Array] = None,
                 static_kv: bool = False) -> Array:
        """Attends from ``inputs_q`` to ``inputs_k``/``inputs_v`` (flax's call plus extras).

        Args:
          inputs_q: ``[..., T, E]`` with ``E = in_features``.
          inputs_k: ``[..., S, E_kv]``; ``None`` means ``inputs_q``.
          inputs_v: ``[..., S, E_kv]``; ``None`` means ``inputs_k``.
          mask: broadcastable to ``[..., N, T, S]``, ``True`` (or nonzero) =
            attend; while decoding ``S`` is the cache length ``L``.
          deterministic: disables dropout; takes precedence over the attribute.
          rngs: :class:`~flax.nnx.Rngs` or stream for dropout; default the
            module's own (``keep_rngs``).
          sow_weights: sow the ``[..., N, T, S]`` weights as
            ``nnx.Intermediate`` ``attention_weights``.
          decode: use the cache (``init_cache`` first); overrides the attribute.
          is_causal: causal self-attention (implied by ``decode``).
          out_sharding, qkv_sharding: passed to the output / q,k,v projections.
          bias, positions, lengths, static_kv: see the class docstring.

        Returns:
          ``[..., T, out_features]``.
        """
        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError("inputs_k cannot be None when inputs_v is given; pass the value to "
                                 "inputs_k and leave inputs_v None to use it for both.")
        if inputs_q.shape[-1] != self.in_features:
            raise ValueError(f"Incompatible input dimension, got {inputs_q.shape[-1]} but the "
                             f"module expects in_features={self.in_features}.")
        if mask is not None and jnp.asarray(mask).dtype != jnp.bool_:
            mask = jnp.asarray(mask) != 0  # flax reads numeric masks as nonzero = attend
        mode = kv_cache.decode_mode(bool(_first(decode, self.decode, False)), static_kv, inputs_k is not None)
        self_attention = inputs_k is None and not static_kv
        if static_kv and self.relative_position is not None:
            raise ValueError("relative_position (RoPE/ALiBi) is for self-attention; construct the "
                             "static_kv (cross-attention) module without it.")
        inputs_k = inputs_q if inputs_k is None else inputs_k
        inputs_v = inputs_k if inputs_v is None else inputs_v

        query = self.query(inputs_q, out_sharding=qkv_sharding)  # [..., T, N, H]
        if mode is Mode.REUSE:
            key, value = self._memory()
        else:  # [..., S, K, H]
            key = self.key(inputs_k, out_sharding=qkv_sharding)
            value = self.value(inputs_v, out_sharding=qkv_sharding)
        if self.normalize_qk:
            assert self.query_ln is not None and self.key_ln is not None  # flax makes both with normalize_qk
            query = self.query_ln(query)
            key = key if mode is Mode.REUSE else self.key_ln(key)

        t, window, overflow = query.shape[-3], self.window, None
        if mode is Mode.APPEND:
            lengths, start = self._check_decode(inputs_q, inputs_k, inputs_v, lengths)
            cached_key, _, cache_index = self._decode_cache()
            # Absolute positions: the fill level plus arange(T); [T] with flax's scalar index.
            level = start if lengths is not None or _cache.ragged(self) else cache_index[...]
            q_pos = kv_cache.query_positions(level, t)
            k_pos = jnp.arange(cached_key.shape[-3], dtype=jnp.int32)
        else:
            q_pos = jnp.arange(t, dtype=jnp.int32) if positions is None else positions
            k_pos = q_pos if self_attention else jnp.arange(key.shape[-3], dtype=jnp.int32)
        if self.relative_position == "rope":  # RoFormer Eq. 34, before caching the keys
            query = apply_rotary(query, q_pos, self.rope_base)
            key = apply_rotary(key, q_pos if mode is Mode.APPEND else k_pos, self.rope_base)
        if mode is Mode.APPEND:
            key, value, overflow = self._write(key, value, start, lengths)
            mask = combine_masks(mask, kv_cache.position_mask(q_pos, k_pos, window=window))
            is_causal, window = False, None
        elif mode is Mode.STORE:
            self.cached_key, self.cached_value = nnx.Cache(key), nnx.Cache(value)
        if self.relative_position == "alibi":  # Press et al. 2022, §3
            slopes = alibi_slopes(self.num_heads)
            right = slopes[::-1] if self.alibi_directional else None
            extra = alibi_bias(slopes, q_pos, k_pos, right)
            bias = extra if bias is None else bias + extra

        out = self._attend(query, key, value, mask, bias, is_causal, window,
                           deterministic, rngs, sow_weights)
        if overflow is not None:
            out = kv_cache.poison(out, overflow)
        return self.out(out, out_sharding=out_sharding)

    def _attend(self, query, key, value, mask, bias, is_causal, window, deterministic, rngs,
                sow_weights):
        """Dropout set-up as flax, then the default or the custom attention function."""
        det, dropout_rng = True, None
        if self.dropout_rate > 0.0:  # as flax: `deterministic` is required only when it matters
            det = _first(deterministic, self.deterministic, None)
            if det is None:
                raise ValueError("MultiHeadAttention has dropout_rate > 0: pass deterministic= to "
                                 "the call or the constructor (or set it with nnx.view).")
            if not det:
                rngs = self.rngs if rngs is None else rngs
                rngs = rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs
                if rngs is None:
                    raise ValueError("dropout needs rngs: pass rngs= to the call, or construct the "
                                     "module with keep_rngs=True.")
                dropout_rng = rngs()
        common = dict(dropout_rate=self.dropout_rate, deterministic=det, dropout_rng=dropout_rng,
                      precision=self.precision)
        if self.attention_fn is None:
            if self.broadcast_dropout and not det:
                raise ValueError("broadcast_dropout=True needs a custom attention_fn that supports "
                                 "it (e.g. nnx.dot_product_attention).")
            out = routed_attention(
                query, key, value, mask=mask, bias=bias, is_causal=is_causal, window=window,
                scale=self.scale, causal_alignment=self.causal_alignment,
                implementation=self.implementation, return_weights=sow_weights, **common)
            if sow_weights:
                out, weights = out
                self.sow(nnx.Intermediate, "attention_weights", weights)
            return out
        if self.broadcast_dropout is not None:
            common["broadcast_dropout"] = self.broadcast_dropout
        return call_attention_fn(
            self.attention_fn, query, key, value, mask=mask, bias=bias, is_causal=is_causal,
            window=window, scale=self.scale, implementation=self.implementation, dtype=self.dtype,
            module=self if sow_weights else None, **common)

    def _check_decode(self, inputs_q, inputs_k, inputs_v, lengths):
        """Raises a ValueError for a decode call that cannot be right.

        Returns ``(lengths, start)``: the validated lengths (int32 ``[...]`` or
        ``None``) and each example's fill level ``[...]``.
        """
        cached_key, _, _ = self._decode_cache()
        if inputs_k.shape[:-1] != inputs_q.shape[:-1] or inputs_v.shape[:-1] != inputs_q.shape[:-1]:
            raise ValueError(
                "decode=True caches self-attention keys, so inputs_k/inputs_v must have the query's "
                f"[..., T] shape; got inputs_q {inputs_q.shape} and inputs_k {inputs_k.shape}. "
                "Call cross-attention with decode=False or static_kv=True.")
        *batch, length, _, _ = cache_shape = cached_key.shape
        t = inputs_q.shape[-2]
        if inputs_q.shape[:-2] != tuple(batch):
            raise ValueError(f"decode inputs {inputs_q.shape} do not match the cache {cache_shape} "
                             "([..., L, K, H]) in batch dims; call init_cache for this batch shape.")
        lengths = kv_cache.check_lengths(lengths, tuple(batch), t)
        start = _cache.fill_levels(self, tuple(batch))
        kv_cache.check_fits(start, lengths, t, length,
                            "call init_cache with an input_shape of the maximum total length")
        return lengths, start

    def _decode_cache(self) -> Tuple[nnx.Cache, nnx.Cache, nnx.Cache]:
        """``(cached_key, cached_value, cache_index)``; a ValueError before ``init_cache``."""
        if self.cached_key is None or self.cached_value is None or self.cache_index is None:
            raise ValueError("Autoregressive cache not initialized: call init_cache(input_shape) "
                             "with the maximum length first (or decode=False).")
        return self.cached_key, self.cached_value, self.cache_index

    def _write(self, key, value, start, lengths):
        """Writes the new keys/values at each example's ``start``; returns the whole cache and
        the overflow flags ``[...]``."""
        cached_key, cached_value, _ = self._decode_cache()
        count, overflow = _cache.advance(self, start, lengths, key.shape[-3], limit=cached_key.shape[-3])
        new_key, _ = kv_cache.write_cache(cached_key[...], key, start, count)
        new_value, _ = kv_cache.write_cache(cached_value[...], value, start, count)
        cached_key[...], cached_value[...] = new_key, new_value
        # The cache is storage: one allocated in another dtype must not make attention mixed-dtype.
        return new_key.astype(key.dtype), new_value.astype(value.dtype), overflow

    def _memory(self):
        """The cross-attention memory stored by an earlier ``static_kv`` call."""
        if self.cached_key is None or self.cached_value is None:
            raise ValueError("static_kv decoding without inputs_k needs an earlier call that passed "
                             "inputs_k (it stores the projected memory in cached_key/cached_value).")
        return self.cached_key[...], self.cached_value[...]


def _first(*values):
    """The first of ``values`` that is not ``None`` (the last is the default)."""
    return next((v for v in values if v is not None), values[-1])
