"""Multi-head attention as a thin linen module over the pure functions.

``MultiHead(Q, K, V) = Concat(head_1, …, head_N) W^O``, ``head_n =
Attention(Q W^Q_n, K W^K_n, V W^V_n)`` (Vaswani et al. 2017, §3.2.2). The
projections are :class:`flax.linen.DenseGeneral` layers laid out exactly like
:class:`flax.linen.MultiHeadDotProductAttention` (``query``/``key``/``value``
kernels ``[E, heads, H]``, ``out`` kernel ``[N, H, E]``), so parameter trees
move between the two unchanged when ``num_kv_heads == num_heads``. The maths
is :func:`flax_attention.scaled_dot_product_attention`.

Autoregressive decoding keeps keys and values in the ``"cache"`` collection:
``cached_key [..., L, K, H]``, ``cached_value [..., L, K, H]`` and the scalar
``cache_index`` (how many positions are filled). Every query at absolute
position ``p`` sees the cached keys at positions ``<= p``. ``decode`` is a call
argument rather than an attribute (flax's choice), so one module instance, and
one parameter tree, serves both teacher forcing and incremental decoding.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attention.attention import scaled_dot_product_attention
from flax_attention.masks import causal_mask_from_positions, combine_masks

Array = jnp.ndarray


class MultiHeadAttention(nn.Module):
    """Multi-head (and grouped-/multi-query) dot-product attention.

    Attributes:
      num_heads: ``N``, query heads.
      num_kv_heads: ``K``, key/value heads; ``None`` means ``N`` (standard
        MHA). ``N % K == 0``; ``K == 1`` is multi-query attention.
      qkv_features: ``N * H``; defaults to the query's feature size ``E``.
      head_dim: ``H``; overrides ``qkv_features // num_heads`` when given.
      out_features: output features; defaults to the query's ``E``.
      dropout_rate: dropout on the attention weights.
      use_bias: biases in the four projections.
      dtype: computation dtype of the projections (logits and softmax are
        float32 regardless); ``None`` infers it from inputs and params.
      param_dtype: parameter dtype.
      kernel_init, bias_init: projection initialisers.
      precision: passed to the projections and both attention einsums.
      sow_weights: sow the ``[..., N, T, S]`` weights into
        ``'intermediates'/'attention_weights'`` (off by default: the fast path
        never keeps them). A call argument of the same name overrides it.
    """

    num_heads: int
    num_kv_heads: Optional[int] = None
    qkv_features: Optional[int] = None
    head_dim: Optional[int] = None
    out_features: Optional[int] = None
    dropout_rate: float = 0.0
    use_bias: bool = True
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    precision: Any = None
    sow_weights: bool = False

    def _dims(self, features: int):
        n = self.num_heads
        k = n if self.num_kv_heads is None else self.num_kv_heads
        if n <= 0 or k <= 0 or n % k:
            raise ValueError(
                f"num_heads={n} must be a positive multiple of num_kv_heads={k}; "
                "choose num_kv_heads among the divisors of num_heads (None = num_heads)."
            )
        if self.head_dim is not None:
            if self.qkv_features is not None and self.qkv_features != n * self.head_dim:
                raise ValueError(
                    f"qkv_features={self.qkv_features} != num_heads * head_dim = "
                    f"{n} * {self.head_dim}; set only one of them."
                )
            return n, k, self.head_dim
        qkv = self.qkv_features or features
        if qkv % n:
            raise ValueError(
                f"qkv_features={qkv} is not divisible by num_heads={n}; "
                "set head_dim explicitly or change qkv_features/num_heads."
            )
        return n, k, qkv // n

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Optional[Array] = None,
        *,
        mask: Optional[Array] = None,
        bias: Optional[Array] = None,
        is_causal: bool = False,
        deterministic: bool = True,
        decode: bool = False,
        sow_weights: Optional[bool] = None,
    ) -> Array:
        """Attends from ``inputs_q`` to ``inputs_kv`` (self-attention if ``None``).

        Args:
          inputs_q: ``[..., T, E]``.
          inputs_kv: ``[..., S, E_kv]``; ``None`` means ``inputs_q``.
          mask: boolean, broadcastable to ``[..., N, T, S]``; ``True`` = attend.
            With ``decode=True``, ``S`` is the cache length ``L`` (e.g. a key
            padding mask over all cache slots).
          bias: float, broadcastable to ``[..., N, T, S]`` (``S = L`` with
            ``decode``), added to the logits.
          is_causal: causal self-attention (ignored with ``decode=True``, which
            is always causal by absolute position).
          deterministic: disables attention dropout.
          decode: use and update the ``"cache"`` collection (self-attention
            only). The first call, inside ``init``, allocates a cache as long
            as the input (the maximum length ``L``); later calls append their
            ``T >= 1`` new positions at ``cache_index`` and must pass
            ``mutable=['cache']``. Overflowing the cache raises a ValueError
            when ``cache_index`` is concrete (eager); under ``jit`` it cannot
            raise, so the output of that step is NaN instead of silently
            overwriting the last slots.
          sow_weights: overrides the ``sow_weights`` attribute.

        Returns:
          ``[..., T, out_features]``.

        Raises:
          ValueError: on bad head settings, a cache without ``init``, or a
            decode step that does not fit in the cache.
        """
        if inputs_kv is None:
            inputs_kv = inputs_q
        n, k, h = self._dims(inputs_q.shape[-1])
        if decode:
            # Fail before any compute: these are all trace-time facts.
            self._check_decode(inputs_q, inputs_kv)
        dense = lambda heads, name: nn.DenseGeneral(  # noqa: E731
            features=(heads, h), axis=-1, use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, kernel_init=self.kernel_init,
            bias_init=self.bias_init, precision=self.precision, name=name,
        )
        query = dense(n, "query")(inputs_q)  # [..., T, N, H]
        key = dense(k, "key")(inputs_kv)  # [..., S, K, H]
        value = dense(k, "value")(inputs_kv)  # [..., S, K, H]

        poison = None
        if decode:
            key, value, mask, poison = self._update_cache(query, key, value, mask)
            is_causal = False  # the cache mask is causal by absolute position

        sow = self.sow_weights if sow_weights is None else sow_weights
        use_dropout = self.dropout_rate > 0.0 and not deterministic
        out = scaled_dot_product_attention(
            query, key, value, mask=mask, bias=bias, is_causal=is_causal,
            dropout_rate=self.dropout_rate, deterministic=deterministic,
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
            return_weights=sow, precision=self.precision,
        )
        if sow:
            out, weights = out
            self.sow("intermediates", "attention_weights", weights)
        if poison is not None:
            # A traced cache_index cannot raise, and dynamic_update_slice
            # clamps the write onto the last slots: NaN makes that loud.
            out = jnp.where(poison, jnp.nan, out).astype(out.dtype)
        return nn.DenseGeneral(
            features=self.out_features or inputs_q.shape[-1], axis=(-2, -1),
            use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init, bias_init=self.bias_init,
            precision=self.precision, name="out",
        )(out)

    def _check_decode(self, inputs_q, inputs_kv):
        """Raises a ValueError for a decode call that cannot be right."""
        if inputs_kv.shape[:-1] != inputs_q.shape[:-1]:
            raise ValueError(
                "decode=True caches self-attention keys, so inputs_kv must have the query's "
                f"[..., T] shape; got inputs_q {inputs_q.shape} and inputs_kv {inputs_kv.shape}. "
                "Call cross-attention with decode=False."
            )
        if not self.has_variable("cache", "cached_key"):
            if self.is_initializing():
                return  # the allocation call
            raise ValueError(
                "decode=True found no 'cache' collection: create it with "
                "model.init(..., decode=True) on inputs of the maximum length (or "
                "flax_attention.init_cache) and pass it with mutable=['cache']."
            )
        cache_shape = self.get_variable("cache", "cached_key").shape
        *batch, length, _, _ = cache_shape
        t = inputs_q.shape[-2]
        if inputs_q.shape[:-2] != tuple(batch):
            raise ValueError(
                f"decode inputs {inputs_q.shape} do not match the cache {cache_shape} "
                "([..., L, K, H]) in batch dims; re-create the cache for this batch shape."
            )
        if t > length:
            raise ValueError(
                f"decode step of T={t} positions cannot fit in a cache of length L={length}; "
                "initialise the cache with a longer input (the maximum total length)."
            )
        index = self.get_variable("cache", "cache_index")
        if not isinstance(index, jax.core.Tracer) and int(index) + t > length:
            raise ValueError(
                f"decode step writes positions {int(index)}..{int(index) + t - 1} past the cache "
                f"length L={length}; initialise the cache with a longer input."
            )

    def _update_cache(self, query, key, value, mask):
        """Writes the new keys/values at ``cache_index``; returns the full cache and mask."""
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        t = query.shape[-3]
        if not initialized:
            # Allocation call (flax pattern): the input fixes L; nothing is
            # written, so the returned cache starts empty at index 0.
            positions = jnp.arange(t)
            return key, value, combine_masks(mask, causal_mask_from_positions(positions, positions)), None

        length = cached_key.value.shape[-3]
        index = cache_index.value
        start = (0,) * (key.ndim - 3) + (index, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, key.astype(cached_key.value.dtype), start)
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, value.astype(cached_value.value.dtype), start)
        cache_index.value = index + t
        # Query p = index + i sees cache slots <= p: filled earlier positions and
        # itself; later (still empty or stale) slots are masked.
        causal = causal_mask_from_positions(index + jnp.arange(t), jnp.arange(length))
        return cached_key.value, cached_value.value, combine_masks(mask, causal), index + t > length
