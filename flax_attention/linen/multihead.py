"""Multi-head attention as a thin linen module over the pure functions.

``MultiHead(Q, K, V) = Concat(head_1, …, head_N) W^O``, ``head_n =
Attention(Q W^Q_n, K W^K_n, V W^V_n)`` (Vaswani et al. 2017, §3.2.2). The
module is a drop-in for :class:`flax.linen.MultiHeadDotProductAttention`: the
same parameter tree (``query``/``key``/``value`` kernels ``[E, heads, H]``,
``out`` kernel ``[N, H, E]``, ``query_ln``/``key_ln`` with ``normalize_qk``),
the same call signature and the same attribute names where they overlap. The
maths is :func:`flax_attention.scaled_dot_product_attention` (or a custom
``attention_fn``), RoPE/ALiBi come from :mod:`flax_attention.functional.positions` and
the cache arithmetic from :mod:`flax_attention.functional.kv_cache`.

Autoregressive decoding (``decode=True``, attribute or call argument) keeps
flax's cache exactly: ``cached_key``/``cached_value [..., L, K, H]`` and a
scalar int32 ``cache_index`` in the ``"cache"`` collection; right-padded
prompts of different lengths add a per-example ``cache_lengths [...]`` (see
:mod:`flax_attention.functional.kv_cache`, which holds the cache logic). Cross-attention
(``static_kv=True``) caches its projected memory once instead.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from flax_attention.functional import kv_cache
from flax_attention.functional.kv_cache import DecodeMode as Mode
from flax_attention.linen import _cache
from flax_attention.functional.context_parallel import routed_attention
from flax_attention.functional.custom_attention import call_attention_fn, einsum_attention, make_einsums
from flax_attention.functional.masks import combine_masks
from flax_attention.linen.partitioning import logical
from flax_attention.functional.positions import alibi_bias, alibi_slopes, apply_rotary, relative_positions

Array = jnp.ndarray
RELATIVE_POSITIONS = (None, "rope", "alibi")


class MultiHeadAttention(nn.Module):
    """Multi-head (and grouped-/multi-query) dot-product attention.

    The attributes have flax's names and meanings unless stated.

    Attributes:
      num_heads: ``N``, query heads.
      dtype, param_dtype: computation / parameter dtype (logits and softmax
        are float32 regardless, so ``force_fp32_for_softmax`` is always on).
        With ``dtype=None`` queries, keys and values are promoted to one
        dtype, as flax does (e.g. bfloat16 queries and a float32 memory).
      qkv_features: ``N * H``; defaults to the query's ``E``.
      out_features: output features; defaults to the query's ``E``.
      broadcast_dropout: share the dropout mask across batch dims; only with an
        ``attention_fn`` that takes it (the default draws one mask per weight).
      dropout_rate: dropout on the attention weights.
      deterministic: as in flax: when ``dropout_rate > 0`` exactly one of this
        attribute and the call argument must be set (``nn.merge_param``).
      precision, kernel_init, out_kernel_init, bias_init, out_bias_init, use_bias: as in flax.
      attention_fn: ``None`` = :func:`scaled_dot_product_attention`; or any
        function ``(query, key, value, **kw)`` such as ``nn.dot_product_attention``.
        It receives only the keyword arguments its signature names; causal and
        window masks are folded into ``mask`` and ``scale`` into the query if it
        does not take them; kv heads are repeated to ``N`` for it.
      decode: autoregressive decoding with the ``"cache"`` collection.
      normalize_qk: LayerNorm on query and key heads (no bias), as flax.
      force_fp32_for_softmax: accepted for compatibility (always float32).
      qkv_dot_general, out_dot_general, qkv_dot_general_cls, out_dot_general_cls: the
        ``dot_general`` (or a factory of it, e.g. AQT's) of the q/k/v and
        output projections, as in flax.
      qk_attn_weights_einsum_cls, attn_weights_value_einsum_cls: factories of
        the two attention einsums (both or neither), as in flax; with the
        default function they select
        :func:`~flax_attention.functional.custom_attention.einsum_attention`.
      num_kv_heads: ``K`` (``None`` = ``N``); ``N % K == 0``.
      head_dim: ``H``; overrides ``qkv_features // num_heads``.
      sow_weights: default of the ``sow_weights`` call argument.
      window, implementation, scale: passed to the attention function (see
        :func:`scaled_dot_product_attention`).
      relative_position: ``None``, ``"rope"`` or ``"alibi"`` (see
        :mod:`flax_attention.functional.positions`).
      rope_base: RoPE frequency base.
      alibi_directional: keys right of the query use the slopes in reversed
        head order (the symmetric form is mirror-invariant); no causal effect.

    Examples:
      Causal self-attention with 4 query heads sharing 2 kv heads:

      >>> import jax, jax.numpy as jnp
      >>> from flax_attention import MultiHeadAttention
      >>> layer = MultiHeadAttention(num_heads=4, num_kv_heads=2)
      >>> x = jnp.ones((2, 6, 16))                      # [B, T, E]
      >>> variables = layer.init(jax.random.key(0), x)
      >>> layer.apply(variables, x, is_causal=True).shape
      (2, 6, 16)
      >>> variables["params"]["key"]["kernel"].shape    # [E, K, H]
      (16, 2, 4)
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
    qkv_dot_general: Optional[Callable[..., Array]] = None
    out_dot_general: Optional[Callable[..., Array]] = None
    qkv_dot_general_cls: Any = None
    out_dot_general_cls: Any = None
    qk_attn_weights_einsum_cls: Optional[Callable[..., Callable[..., Array]]] = None
    attn_weights_value_einsum_cls: Optional[Callable[..., Callable[..., Array]]] = None

    def _dims(self, features: int, static_kv: bool):
        n = self.num_heads
        k = n if self.num_kv_heads is None else self.num_kv_heads
        if n <= 0 or k <= 0 or n % k:
            raise ValueError(
                f"num_heads={n} must be a positive multiple of num_kv_heads={k}; "
                "choose num_kv_heads among the divisors of num_heads (None = num_heads).")
        if self.relative_position not in RELATIVE_POSITIONS:
            raise ValueError(f"relative_position must be one of {RELATIVE_POSITIONS}, "
                             f"got {self.relative_position!r}.")
        if static_kv and self.relative_position is not None:
            raise ValueError("relative_position (RoPE/ALiBi) is for self-attention; construct the "
                             "static_kv (cross-attention) module without it.")
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
        key_positions: Optional[Array] = None,
        lengths: Optional[Array] = None,
        static_kv: bool = False,
    ) -> Array:
        """Attends from ``inputs_q`` to ``inputs_k``/``inputs_v`` (flax's signature plus extras).

        Args:
          inputs_q: ``[..., T, E]``.
          inputs_k: ``[..., S, E_k]``; ``None`` means ``inputs_q`` (self-attention).
          inputs_v: ``[..., S, E_v]``; ``None`` means ``inputs_k``.
          inputs_kv: deprecated flax alias setting both ``inputs_k`` and ``inputs_v``.
          mask: boolean, broadcastable to ``[..., N, T, S]`` (``S = L`` with
            ``decode``); ``True`` = attend. A numeric mask (flax's float 0/1)
            is read as ``mask != 0``, as flax does (``bias`` is additive).
          deterministic: disables dropout; see the attribute.
          dropout_rng: dropout key; default ``self.make_rng('dropout')``.
          sow_weights: sow the ``[..., N, T, S]`` weights into
            ``'intermediates'/'attention_weights'``; ``None`` = the attribute.
          bias: float logit bias, broadcastable to ``[..., N, T, S]``.
          is_causal: causal self-attention (implied by ``decode``).
          decode: overrides the ``decode`` attribute. ``init`` allocates flax's
            cache as long as its input (``L``); later calls (``mutable=['cache']``)
            write their ``T`` positions at the cache index; a write past ``L``
            raises, or under ``jit`` is skipped with a NaN output (see
            :mod:`flax_attention.functional.kv_cache`).
          positions: int ``[..., T]`` query positions for RoPE/ALiBi without
            ``decode``; default ``arange(T)``.
          key_positions: int ``[..., S]`` key positions; default ``positions``
            when the keys are the queries' sequence (``inputs_k`` omitted, or
            ``S == T``), else ``arange(S)``.
          lengths: int ``[...]`` with ``decode``: how many of the ``T`` new
            positions are real (right-padded prompts, in ``[0, T]``); adds the
            per-example ``cache_lengths`` to the cache. Default ``T``.
          static_kv: with ``decode``, treat ``inputs_k``/``inputs_v`` as a fixed
            memory (cross-attention): projected on the call that passes them
            and stored as ``cached_key``/``cached_value [..., S, K, H]``; a call
            with ``inputs_k=None`` reuses them instead of projecting again.

        Returns:
          ``[..., T, out_features]``.
        """
        inputs_k, inputs_v, reuse = _resolve_inputs(inputs_q, inputs_k, inputs_v, inputs_kv, static_kv)
        if mask is not None and jnp.asarray(mask).dtype != jnp.bool_:
            mask = jnp.asarray(mask) != 0  # flax's reading of numeric masks
        mode = kv_cache.decode_mode(self.decode if decode is None else decode, static_kv, not reuse)
        n, k, h = self._dims(inputs_q.shape[-1], static_kv)
        if mode is Mode.APPEND:
            lengths = _cache.check_decode(self, inputs_q, inputs_k, inputs_v, lengths)

        dense = lambda heads, axis, name: nn.DenseGeneral(  # noqa: E731
            features=(heads, h), axis=-1, use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, kernel_init=logical(self.kernel_init, ("embed", axis, "kv")),
            bias_init=logical(self.bias_init, (axis, "kv")), precision=self.precision,
            dot_general=self.qkv_dot_general, dot_general_cls=self.qkv_dot_general_cls, name=name)
        query = dense(n, "heads", "query")(inputs_q)  # [..., T, N, H]
        if mode is Mode.REUSE:
            key, value = _cache.static_memory(self, None, None)
        else:  # [..., S, K, H]
            key, value = dense(k, "kv_heads", "key")(inputs_k), dense(k, "kv_heads", "value")(inputs_v)
        if self.normalize_qk:
            ln = lambda name: nn.LayerNorm(  # noqa: E731
                use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
            query = ln("query_ln")(query)
            key = key if mode is Mode.REUSE else ln("key_ln")(key)
        # Mixed precision as in flax: promote (e.g. bf16 queries, float32 memory -> float32).
        query, key, value = promote_dtype(query, key, value, dtype=self.dtype)

        t, window, overflow = query.shape[-3], self.window, None
        if mode is Mode.APPEND:  # absolute positions: each example's fill level plus arange(T)
            start, q_pos, k_pos = _cache.decode_positions(self, query.shape[:-3], t)
        else:
            q_pos, k_pos = relative_positions(positions, key_positions, t, key.shape[-3], inputs_k is inputs_q)
        if self.relative_position == "rope":  # RoFormer Eq. 34, before caching the keys
            query = apply_rotary(query, q_pos, self.rope_base)
            key = apply_rotary(key, q_pos if mode is Mode.APPEND else k_pos, self.rope_base)
        if mode is Mode.APPEND:
            key, value, overflow = _cache.update(self, key, value, start, lengths)
            mask = combine_masks(mask, kv_cache.position_mask(q_pos, k_pos, window=window))
            is_causal, window = False, None
        elif mode is Mode.STORE and not self.is_initializing():
            _cache.static_memory(self, key, value)  # init_cache allocates none: S is unknown there
        if self.relative_position == "alibi":  # Press et al. 2022, §3
            slopes = alibi_slopes(n)
            right = slopes[::-1] if self.alibi_directional else None
            alibi = alibi_bias(slopes, q_pos, k_pos, right)
            bias = alibi if bias is None else bias + alibi

        sow = self.sow_weights if sow_weights is None else sow_weights
        det = True
        if self.dropout_rate > 0.0:  # as flax: required only when it matters
            det = nn.merge_param("deterministic", self.deterministic, deterministic)
            if not det and dropout_rng is None:
                dropout_rng = self.make_rng("dropout")
        out = self._attend(query, key, value, mask, bias, is_causal, window, det, dropout_rng, sow)
        if overflow is not None:
            out = kv_cache.poison(out, overflow)
        return nn.DenseGeneral(
            features=self.out_features or inputs_q.shape[-1], axis=(-2, -1),
            use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=logical(self.out_kernel_init or self.kernel_init, ("heads", "kv", "embed")),
            bias_init=logical(self.out_bias_init or self.bias_init, ("embed",)), precision=self.precision,
            dot_general=self.out_dot_general, dot_general_cls=self.out_dot_general_cls, name="out")(out)

    def _attend(self, query, key, value, mask, bias, is_causal, window, det, rng, sow):
        """Runs the default or custom attention function; sows the weights if asked."""
        common = dict(dropout_rate=self.dropout_rate, deterministic=det, dropout_rng=rng,
                      precision=self.precision)
        einsums = make_einsums(self.qk_attn_weights_einsum_cls, self.attn_weights_value_einsum_cls)
        fn = self.attention_fn
        if fn is None and einsums:
            fn = einsum_attention  # the einsum classes replace the default path's einsums (flax: AQT)
        if fn is None:
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
            fn, query, key, value, mask=mask, bias=bias, is_causal=is_causal,
            window=window, scale=self.scale, implementation=self.implementation,
            broadcast_dropout=self.broadcast_dropout, dtype=self.dtype,
            module=self if sow else None, **einsums, **common)


def _resolve_inputs(inputs_q, inputs_k, inputs_v, inputs_kv, static_kv):
    """flax's input rules: ``(inputs_k, inputs_v, reuse)``; ``reuse``: static_kv with no new memory."""
    if inputs_kv is not None:
        if inputs_k is not None or inputs_v is not None:
            raise ValueError("pass either inputs_kv (deprecated) or inputs_k/inputs_v, not both.")
        inputs_k = inputs_v = inputs_kv
    elif inputs_k is None and inputs_v is not None:
        raise ValueError("inputs_k cannot be None when inputs_v is given.")
    reuse = static_kv and inputs_k is None
    inputs_k = inputs_q if inputs_k is None else inputs_k
    return inputs_k, inputs_k if inputs_v is None else inputs_v, reuse

