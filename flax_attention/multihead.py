"""Multi-head attention as a thin linen module over the pure functions.

``MultiHead(Q, K, V) = Concat(head_1, …, head_N) W^O``, ``head_n =
Attention(Q W^Q_n, K W^K_n, V W^V_n)`` (Vaswani et al. 2017, §3.2.2). The
module is a drop-in for :class:`flax.linen.MultiHeadDotProductAttention`: the
same parameter tree (``query``/``key``/``value`` kernels ``[E, heads, H]``,
``out`` kernel ``[N, H, E]``, ``query_ln``/``key_ln`` with ``normalize_qk``),
the same call signature and the same attribute names where they overlap. The
maths is :func:`flax_attention.scaled_dot_product_attention` (or a custom
``attention_fn``), RoPE/ALiBi come from :mod:`flax_attention.positions` and
the cache arithmetic from :mod:`flax_attention.kv_cache`.

Autoregressive decoding (``decode=True``, attribute or call argument) keeps
``cached_key``/``cached_value [..., L, K, H]``, a per-example ``cache_index
[...]`` (int32) and a per-example ``cache_overflow [...]`` flag in the
``"cache"`` collection; see :mod:`flax_attention.kv_cache` for right-padded
prompts of different lengths. Cross-attention (``static_kv=True``) caches its
projected memory once instead.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_attention import kv_cache
from flax_attention.context_parallel import routed_attention
from flax_attention.custom_attention import call_attention_fn
from flax_attention.masks import combine_masks
from flax_attention.partitioning import logical
from flax_attention.positions import alibi_bias, alibi_slopes, apply_rotary

Array = jnp.ndarray
RELATIVE_POSITIONS = (None, "rope", "alibi")


class MultiHeadAttention(nn.Module):
    """Multi-head (and grouped-/multi-query) dot-product attention.

    Attributes (flax's names and meanings unless stated):
      num_heads: ``N``, query heads.
      dtype, param_dtype: computation / parameter dtype (logits and softmax
        are float32 regardless, so ``force_fp32_for_softmax`` is always on).
      qkv_features: ``N * H``; defaults to the query's ``E``.
      out_features: output features; defaults to the query's ``E``.
      broadcast_dropout: share the dropout mask across batch dims. Only with a
        custom ``attention_fn`` that accepts it (e.g. ``nn.dot_product_attention``):
        the default function draws one mask element per weight, hence default False.
      dropout_rate: dropout on the attention weights.
      deterministic: as in flax: when ``dropout_rate > 0`` exactly one of this
        attribute and the call argument must be set (``nn.merge_param``).
      precision, kernel_init, out_kernel_init, bias_init, out_bias_init, use_bias.
      attention_fn: ``None`` = :func:`scaled_dot_product_attention`; or any
        function ``(query, key, value, **kw)`` such as ``nn.dot_product_attention``.
        It receives only the keyword arguments its signature names; causal and
        window masks are folded into ``mask`` and ``scale`` into the query if it
        does not take them; kv heads are repeated to ``N`` for it.
      decode: autoregressive decoding with the ``"cache"`` collection.
      normalize_qk: LayerNorm on query and key heads (no bias), as flax.
      force_fp32_for_softmax: accepted for compatibility (always float32).
      num_kv_heads: ``K`` (``None`` = ``N``); ``N % K == 0``.
      head_dim: ``H``; overrides ``qkv_features // num_heads``.
      sow_weights: default of the ``sow_weights`` call argument.
      window, implementation, scale: passed to the attention function (see
        :func:`scaled_dot_product_attention`).
      relative_position: ``None``, ``"rope"`` (rotate q/k by their positions)
        or ``"alibi"`` (add ``-m_n |i - j|`` to the logits); see
        :mod:`flax_attention.positions`.
      rope_base: RoPE frequency base.
      alibi_directional: ALiBi keys to the right of the query (``j > i``) use
        the slopes in reversed head order, so bidirectional attention can tell
        left from right (the symmetric form is mirror-invariant); no effect on
        causal attention.
    """

    num_heads: int
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    qkv_features: Optional[int] = None
    out_features: Optional[int] = None
    broadcast_dropout: bool = False
    dropout_rate: float = 0.0
    deterministic: Optional[bool] = None
    precision: Any = None
    kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
    out_kernel_init: Optional[nn.initializers.Initializer] = None
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    out_bias_init: Optional[nn.initializers.Initializer] = None
    use_bias: bool = True
    attention_fn: Optional[Callable[..., Array]] = None
    decode: bool = False
    normalize_qk: bool = False
    force_fp32_for_softmax: bool = True
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    sow_weights: bool = False
    window: Any = None
    implementation: Optional[str] = None
    scale: Optional[float] = None
    relative_position: Optional[str] = None
    rope_base: float = 10000.0
    alibi_directional: bool = False

    def _dims(self, features: int):
        n = self.num_heads
        k = n if self.num_kv_heads is None else self.num_kv_heads
        if n <= 0 or k <= 0 or n % k:
            raise ValueError(
                f"num_heads={n} must be a positive multiple of num_kv_heads={k}; "
                "choose num_kv_heads among the divisors of num_heads (None = num_heads).")
        if self.relative_position not in RELATIVE_POSITIONS:
            raise ValueError(f"relative_position must be one of {RELATIVE_POSITIONS}, "
                             f"got {self.relative_position!r}.")
        if self.head_dim is not None:
            if self.qkv_features is not None and self.qkv_features != n * self.head_dim:
                raise ValueError(f"qkv_features={self.qkv_features} != num_heads * head_dim = "
                                 f"{n} * {self.head_dim}; set only one of them.")
            return n, k, self.head_dim
        qkv = self.qkv_features or features
        if qkv % n:
            raise ValueError(f"qkv_features={qkv} is not divisible by num_heads={n}; "
                             "set head_dim explicitly or change qkv_features/num_heads.")
        return n, k, qkv // n

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Optional[Array] = None,
        inputs_v: Optional[Array] = None,
        *,
        inputs_kv: Optional[Array] = None,
        mask: Optional[Array] = None,
        deterministic: Optional[bool] = None,
        dropout_rng: Optional[jax.Array] = None,
        sow_weights: Optional[bool] = None,
        bias: Optional[Array] = None,
        is_causal: bool = False,
        decode: Optional[bool] = None,
        positions: Optional[Array] = None,
        lengths: Optional[Array] = None,
        static_kv: bool = False,
    ) -> Array:
        """Attends from ``inputs_q`` to ``inputs_k``/``inputs_v`` (flax's signature plus extras).

        Args:
          inputs_q: ``[..., T, E]``.
          inputs_k: ``[..., S, E_k]``; ``None`` means ``inputs_q`` (self-attention).
          inputs_v: ``[..., S, E_v]``; ``None`` means ``inputs_k``.
          inputs_kv: deprecated flax alias setting both ``inputs_k`` and ``inputs_v``.
          mask: boolean, broadcastable to ``[..., N, T, S]``; ``True`` = attend.
            With ``decode``, ``S`` is the cache length ``L``. As in flax, a
            numeric mask (``nn.make_attention_mask`` gives float 0/1) is read as
            ``mask != 0``; it is not an additive bias (use ``bias`` for that).
          deterministic: disables dropout; see the attribute.
          dropout_rng: dropout key; default ``self.make_rng('dropout')``.
          sow_weights: sow the ``[..., N, T, S]`` weights into
            ``'intermediates'/'attention_weights'``; ``None`` = the attribute.
          bias: float logit bias, broadcastable to ``[..., N, T, S]``.
          is_causal: causal self-attention (implied by ``decode``).
          decode: overrides the ``decode`` attribute. The call inside ``init``
            allocates an empty cache as long as the input (``L``); later calls
            (``mutable=['cache']``) write their ``T`` new positions at each
            example's ``cache_index``. A write past ``L`` raises a ValueError
            when the index is concrete; under ``jit`` that example's cache is
            left intact, its ``cache_overflow`` flag is set and its output is NaN.
          positions: int ``[..., T]`` query (= key, for self-attention)
            positions for RoPE/ALiBi without ``decode``; default ``arange``.
          lengths: int ``[...]`` with ``decode``: how many of the ``T`` new
            positions are real (right-padded prompts); default ``T``.
          static_kv: with ``decode``, treat ``inputs_k``/``inputs_v`` as a fixed
            memory (cross-attention): projected on the call that passes them
            and stored as ``cached_key``/``cached_value [..., S, K, H]``; a call
            with ``inputs_k=None`` reuses them instead of projecting again.

        Returns:
          ``[..., T, out_features]``.
        """
        if inputs_kv is not None:
            if inputs_k is not None or inputs_v is not None:
                raise ValueError("pass either inputs_kv (deprecated) or inputs_k/inputs_v, not both.")
            inputs_k = inputs_v = inputs_kv
        elif inputs_k is None and inputs_v is not None:
            raise ValueError("inputs_k cannot be None when inputs_v is given.")
        if mask is not None and jnp.asarray(mask).dtype != jnp.bool_:
            mask = jnp.asarray(mask) != 0  # flax's reading of numeric masks
        decode = self.decode if decode is None else decode
        reuse_kv = decode and static_kv and inputs_k is None
        self_attention = inputs_k is None and not static_kv
        inputs_k = inputs_q if inputs_k is None else inputs_k
        inputs_v = inputs_k if inputs_v is None else inputs_v
        n, k, h = self._dims(inputs_q.shape[-1])
        append = decode and not static_kv
        if static_kv and self.relative_position is not None:
            raise ValueError("relative_position (RoPE/ALiBi) is for self-attention; construct the "
                             "static_kv (cross-attention) module without it.")
        if append:
            self._check_decode(inputs_q, inputs_k, inputs_v, lengths)

        dense = lambda heads, axis, name: nn.DenseGeneral(  # noqa: E731
            features=(heads, h), axis=-1, use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, kernel_init=logical(self.kernel_init, ("embed", axis, "kv")),
            bias_init=logical(self.bias_init, (axis, "kv")), precision=self.precision, name=name)
        query = dense(n, "heads", "query")(inputs_q)  # [..., T, N, H]
        if reuse_kv:
            key, value = self._static_cache(None, None)
        else:  # [..., S, K, H]
            key, value = dense(k, "kv_heads", "key")(inputs_k), dense(k, "kv_heads", "value")(inputs_v)
        if self.normalize_qk:
            ln = lambda name: nn.LayerNorm(  # noqa: E731
                use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
            query = ln("query_ln")(query)
            key = key if reuse_kv else ln("key_ln")(key)

        t, window, overflow = query.shape[-3], self.window, None
        if append:
            # Positions are absolute: the cache offset plus arange(T), per example.
            q_pos = kv_cache.query_positions(self._index(inputs_q), t)
            k_pos = jnp.arange(self.get_variable("cache", "cached_key").shape[-3], dtype=jnp.int32) \
                if self.has_variable("cache", "cached_key") else q_pos
        else:
            q_pos = jnp.arange(t, dtype=jnp.int32) if positions is None else positions
            k_pos = q_pos if self_attention else jnp.arange(key.shape[-3], dtype=jnp.int32)
        if self.relative_position == "rope":  # RoFormer Eq. 34, before caching the keys
            query = apply_rotary(query, q_pos, self.rope_base)
            key = apply_rotary(key, q_pos if append else k_pos, self.rope_base)
        if append:
            key, value, overflow = self._update_cache(key, value, lengths)
            mask = combine_masks(mask, kv_cache.position_mask(q_pos, k_pos, window=window))
            is_causal, window = False, None
        elif static_kv and decode and not reuse_kv and not self.is_initializing():
            self._static_cache(key, value)  # init_cache allocates none: S is unknown there
        if self.relative_position == "alibi":  # Press et al. 2022, §3
            slopes = alibi_slopes(n)
            right = slopes[::-1] if self.alibi_directional else None
            bias = _add(bias, alibi_bias(slopes, q_pos, k_pos, right))

        sow = self.sow_weights if sow_weights is None else sow_weights
        det = True
        if self.dropout_rate > 0.0:  # as flax: required only when it matters
            det = nn.merge_param("deterministic", self.deterministic, deterministic)
            if not det and dropout_rng is None:
                dropout_rng = self.make_rng("dropout")
        out = self._attend(query, key, value, mask, bias, is_causal, window, det, dropout_rng, sow)
        if overflow is not None:
            out = jnp.where(overflow[..., None, None, None], jnp.nan, out).astype(out.dtype)
        return nn.DenseGeneral(
            features=self.out_features or inputs_q.shape[-1], axis=(-2, -1),
            use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=logical(self.out_kernel_init or self.kernel_init, ("heads", "kv", "embed")),
            bias_init=logical(self.out_bias_init or self.bias_init, ("embed",)),
            precision=self.precision, name="out")(out)

    def _attend(self, query, key, value, mask, bias, is_causal, window, det, rng, sow):
        """Runs the default or custom attention function; sows the weights if asked."""
        common = dict(dropout_rate=self.dropout_rate, deterministic=det, dropout_rng=rng,
                      precision=self.precision)
        if self.attention_fn is None:
            if self.broadcast_dropout and self.dropout_rate > 0.0 and not det:
                raise ValueError("broadcast_dropout=True needs a custom attention_fn that supports it "
                                 "(e.g. nn.dot_product_attention); the default draws one mask per weight.")
            out = routed_attention(
                query, key, value, mask=mask, bias=bias, is_causal=is_causal, window=window,
                scale=self.scale, implementation=self.implementation, return_weights=sow, **common)
            if sow:
                out, weights = out
                self.sow("intermediates", "attention_weights", weights)
            return out
        return call_attention_fn(
            self.attention_fn, query, key, value, mask=mask, bias=bias, is_causal=is_causal,
            window=window, scale=self.scale, implementation=self.implementation,
            broadcast_dropout=self.broadcast_dropout, dtype=self.dtype,
            module=self if sow else None, **common)

    def _index(self, inputs_q):
        """The per-example cache index ``[...]`` (int32); a scalar (older caches) is broadcast."""
        batch = inputs_q.shape[:-2]
        if not self.has_variable("cache", "cache_index"):
            return jnp.zeros(batch, jnp.int32)
        index = self.get_variable("cache", "cache_index")
        return jnp.broadcast_to(jnp.asarray(index, jnp.int32), batch)

    def _check_decode(self, inputs_q, inputs_k, inputs_v, lengths):
        """Raises a ValueError for a decode call that cannot be right (trace-time facts)."""
        if inputs_k.shape[:-1] != inputs_q.shape[:-1] or inputs_v.shape[:-1] != inputs_q.shape[:-1]:
            raise ValueError(
                "decode=True caches self-attention keys, so inputs_k/inputs_v must have the query's "
                f"[..., T] shape; got inputs_q {inputs_q.shape} and inputs_k {inputs_k.shape}. "
                "Call cross-attention with decode=False or static_kv=True.")
        if not self.has_variable("cache", "cached_key"):
            if self.is_initializing():
                return  # the allocation call
            raise ValueError(
                "decode=True found no 'cache' collection: create it with model.init(..., decode=True) "
                "on inputs of the maximum length (or flax_attention.init_cache) and pass it with "
                "mutable=['cache'].")
        cache_shape = self.get_variable("cache", "cached_key").shape
        *batch, length, _, _ = cache_shape
        t = inputs_q.shape[-2]
        if inputs_q.shape[:-2] != tuple(batch):
            raise ValueError(f"decode inputs {inputs_q.shape} do not match the cache {cache_shape} "
                             "([..., L, K, H]) in batch dims; re-create the cache for this batch shape.")
        if t > length:
            raise ValueError(f"decode step of T={t} positions cannot fit in a cache of length L={length}; "
                             "initialise the cache with a longer input (the maximum total length).")
        index = self.get_variable("cache", "cache_index")
        count = t if lengths is None else lengths
        if not isinstance(index, jax.core.Tracer) and not isinstance(count, jax.core.Tracer):
            last = np.max(np.asarray(index) + np.asarray(count))
            if last > length:
                raise ValueError(f"decode step writes up to position {last - 1}, past the cache length "
                                 f"L={length}; initialise the cache with a longer input.")

    def _update_cache(self, key, value, lengths):
        """Writes the new keys/values per example; returns the full cache and the overflow flags."""
        initialized = self.has_variable("cache", "cached_key")
        batch = key.shape[:-3]
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros(batch, jnp.int32))
        flag = self.variable("cache", "cache_overflow", lambda: jnp.zeros(batch, bool))
        if not initialized:
            # Allocation call (flax pattern): the input fixes L; nothing is written.
            return key, value, jnp.zeros(batch, bool)
        t = key.shape[-3]
        start = jnp.broadcast_to(jnp.asarray(index.value, jnp.int32), batch)
        count = jnp.broadcast_to(jnp.asarray(t if lengths is None else lengths, jnp.int32), batch)
        cached_key.value, overflow = kv_cache.write_cache(cached_key.value, key, start, count)
        cached_value.value, _ = kv_cache.write_cache(cached_value.value, value, start, count)
        index.value = start + count
        flag.value = jnp.broadcast_to(flag.value, batch) | overflow
        # The cache is storage: a cache allocated in another dtype (e.g. from a float64
        # dummy input under jax_enable_x64) must not turn this step into mixed-dtype attention.
        return cached_key.value.astype(key.dtype), cached_value.value.astype(value.dtype), overflow

    def _static_cache(self, key, value):
        """Stores (``key`` given) or returns (``key=None``) the cross-attention memory."""
        if key is not None:
            self.put_variable("cache", "cached_key", key)
            self.put_variable("cache", "cached_value", value)
            return key, value
        if not self.has_variable("cache", "cached_key"):
            raise ValueError("static_kv decoding without inputs_k needs an earlier call that passed "
                             "inputs_k (it stores the projected memory in the 'cache').")
        return self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value")


def _add(a: Optional[Array], b: Array) -> Array:
    return b if a is None else a + b
