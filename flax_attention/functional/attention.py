"""Scaled dot-product attention as pure functions (Vaswani et al. 2017, Eq. 1).

``Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V``

Layouts follow the shape legend of :mod:`flax_attention`: query ``[..., T, N, H]``,
key ``[..., S, K, H]``, value ``[..., S, K, D]``, output ``[..., T, N, D]``,
weights ``[..., N, T, S]``.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention.core.checks import prepare
from flax_attention.core.dtypes import compute_dtype, mask_fill, not_neg_inf
from flax_attention.core.masks import causal_mask, check_alignment, combine_masks, sliding_window_mask
from flax_attention.core.tracing import forward_mode_active, nested_reverse_mode_active, vmapped_size
from flax_attention.kernels.backend_select import AUTO_CHUNKED_BYTES, AttentionCall, describe, resolve
from flax_attention.kernels.backends import fused_attention
from flax_attention.kernels.flash import _chunked

Array = jnp.ndarray


def masked_softmax(logits: Array, mask: Optional[Array] = None, axis: int = -1) -> Array:
    """Softmax that gives exact zeros, and finite gradients, to fully-masked rows.

    Computed in at least float32 and at least the input precision (bfloat16
    and float16 -> float32, float64 stays float64); the caller casts back.
    ``-inf`` entries in ``logits`` (e.g. from an additive bias) behave like
    masked entries. A row where every entry is masked or ``-inf`` yields zeros,
    never NaN: this is the guarantee ``jax.nn.softmax`` and PyTorch's SDPA do
    not make. No infinity is created along the way (``jax.debug_infs`` safe).

    Args:
      logits: ``[..., S]`` (any float dtype).
      mask: boolean, broadcastable to ``logits``; ``True`` = keep.
      axis: the axis to normalise over.

    Returns:
      Probabilities in the compute dtype, same shape as ``logits``.

    Raises:
      ValueError: if ``mask`` is not boolean or does not broadcast to ``logits``.
    """
    logits = logits if isinstance(logits, jax.Array) else jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        logits = logits.astype(jnp.float32)
    cdt = compute_dtype(logits.dtype)
    # -inf entries are masked first, so no later op outputs an infinity.
    keep = not_neg_inf(logits)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise ValueError(
                f"mask must be boolean (True = keep), got dtype {mask.dtype}; pass mask.astype(bool) "
                "(a float/int mask would be read with the opposite meaning by additive-mask code)."
            )
        try:
            ok = np.broadcast_shapes(mask.shape, logits.shape) == logits.shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"mask of shape {mask.shape} does not broadcast to logits {logits.shape}.")
        keep = keep & mask
    finite = jax.lax.select(jnp.broadcast_to(keep, logits.shape), logits, jax.lax.full_like(logits, 0))
    return _softmax(finite.astype(cdt), keep, axis)


def _softmax(logits: Array, keep: Optional[Array], axis: int = -1) -> Array:
    """Masked softmax of finite ``logits`` (compute dtype); ``keep=None`` keeps all."""
    if keep is None and logits.shape[axis] > 0:  # S = 0: the guarded form returns the empty result
        return _unmasked_softmax(logits, axis)
    return _guarded_softmax(logits, keep, axis)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _unmasked_softmax(logits: Array, axis: int) -> Array:
    """Softmax of finite logits with nothing masked: the plain formula, no guards.

    The row maximum contributes ``exp(0) = 1``, so the denominator is >= 1 and
    the division needs no guard; without the guard's select XLA:CPU fuses
    ``Q Kᵀ -> softmax -> P V`` into one kernel (the logits never reach memory;
    B=4 T=S=512 N=8 float32: 0.22 -> 0.05 GB accessed in XLA's cost analysis;
    forward 0.79-0.91x the guarded form's time at T <= 1024 on a 2-core AMD EPYC,
    the same at T = 2048: benchmarks/results/cpu_levers.md). Differentiated, it
    takes the guarded form's derivative (the JVP rule below): the derivative of
    this form was measured slower in fwd+bwd (XLA splits it, with more temporaries).
    """
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=axis, keepdims=True))
    unnormalized = jnp.exp(logits - row_max)
    return unnormalized / jnp.sum(unnormalized, axis=axis, keepdims=True)


@_unmasked_softmax.defjvp
def _unmasked_softmax_jvp(axis, primals, tangents):
    return jax.jvp(lambda x: _guarded_softmax(x, None, axis), primals, tangents)


def _guarded_softmax(logits: Array, keep: Optional[Array], axis: int = -1) -> Array:
    """:func:`_softmax` with a guard for rows where ``keep`` leaves nothing."""
    fill = mask_fill(logits.dtype)
    if keep is not None:
        # Fill before exp with a finite value: a `where` after exp would leak NaN
        # into gradients of masked entries whose exp overflowed, and -inf would
        # trip jax.debug_infs.
        logits = jnp.where(keep, logits, fill)
    # Softmax is shift-invariant, so the max needs no gradient. `initial` makes
    # an empty axis (S = 0) valid; a dead row has max = fill and is zeroed below.
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=axis, keepdims=True, initial=fill))
    unnormalized = jnp.exp(logits - row_max)
    if keep is not None:
        unnormalized = jnp.where(keep, unnormalized, 0)
    denom = jnp.sum(unnormalized, axis=axis, keepdims=True)
    return unnormalized / jnp.where(denom > 0, denom, 1)


def attention_weights(
    query: Array,
    key: Array,
    *,
    mask: Optional[Array] = None,
    bias: Optional[Array] = None,
    scale: Optional[float] = None,
    is_causal: bool = False,
    causal_alignment: str = "bottom_right",
    precision=None,
) -> Array:
    """Attention probabilities ``softmax(Q Kᵀ · scale + bias)`` over keys.

    Args:
      query: ``[..., T, N, H]``, floating.
      key: ``[..., S, K, H]`` with ``N % K == 0``, same dtype as ``query``.
      mask: boolean, broadcastable to ``[..., N, T, S]``; ``True`` = attend.
      bias: float, broadcastable to ``[..., N, T, S]``, added to the logits
        (``-inf`` entries act as a mask).
      scale: logit scale (a float or a traced scalar); defaults to ``1 / sqrt(H)``.
      is_causal: also apply :func:`~flax_attention.functional.masks.causal_mask`.
      causal_alignment: ``"bottom_right"`` or ``"top_left"`` when ``T != S``.
      precision: passed to the einsum.

    Returns:
      ``[..., N, T, S]`` in the compute dtype (float32, or float64 for float64
      inputs); fully-masked rows are all zeros.
    """
    query, key, _, mask, bias, bias_keep = prepare(query, key, None, mask, bias, scale)
    mask = combine_masks(mask, bias_keep)
    return _dense_weights(query, key, mask, bias, scale, is_causal, causal_alignment, precision)


def _dense_weights(query, key, mask, bias, scale, is_causal, causal_alignment, precision):
    """:func:`attention_weights` on validated arrays."""
    check_alignment(causal_alignment)  # checked even when unused: a typo is a bug
    *batch, t, n, h = query.shape
    s, k = key.shape[-3], key.shape[-2]
    g = n // k
    cdt = compute_dtype(query.dtype)
    scale = jnp.asarray(1.0 / np.sqrt(h) if scale is None else scale, cdt)
    # Grouped heads: each kv head serves G query heads without repeating keys.
    # Folding G into the query axis (Q = G·T rows per kv head) makes this one
    # batched matmul over [..., K]; measured ~1.5x faster on CPU than an
    # einsum that keeps K and G as separate output axes.
    if _one_query(query.shape, k):
        logits = _one_query_logits(query, key, precision, cdt) * scale
    else:
        q = jnp.moveaxis(query.reshape(*batch, t, k, g, h), -4, -2)  # [..., K, G, T, H]
        q = q.reshape(*batch, k, g * t, h)
        logits = jnp.einsum(
            "...kqh,...skh->...kqs", q, key,
            precision=precision, preferred_element_type=cdt,
        )
        logits = logits.reshape(*batch, n, t, s) * scale
    if bias is not None:
        logits = logits + bias.astype(cdt)  # finite: prepare moved -inf entries to bias_keep
    if is_causal:
        mask = combine_masks(mask, causal_mask(t, s, alignment=causal_alignment))
    return _softmax(logits, mask)


def _one_query(query_shape: tuple, k: int) -> bool:
    """Whether a call takes the one-query form below (a CPU decode step, see there)."""
    *batch, t, _, _ = query_shape
    return t == 1 and k > 1 and int(np.prod(batch)) > 1 and jax.default_backend() == "cpu"


def _own_head(n: int, k: int) -> Array:
    """Boolean ``[N, K]``: query head ``i`` reads kv head ``i // G``."""
    return (np.arange(n)[:, None] // (n // k)) == np.arange(k)[None, :]


# A decode step's keys/values (a KV cache, [..., S, K, H]) are read in their own
# layout: the batched matmul over [..., K] above needs them as [..., K, S, H],
# and XLA:CPU materialises that transpose of the whole cache at every step
# (47% of a B=16 step of the LM benchmark's generation loop, profiled). Folding (S, K)
# into one axis instead makes both products plain matmuls over the stored
# layout; every query head meets every kv head (K times the multiply-adds,
# N·S·K·H: small next to the copy when T = 1) and the pairs i // G != k are
# dropped. Measured in that loop on the 2-core AMD EPYC Zen 3 VM (decode
# tokens/s, this form vs the transposing one): B=2 1308 vs 1222, B=4 1525 vs
# 1119, B=16 2571 vs 1541, but B=1 1138 vs 2210 (a one-example transpose is
# cheap), hence the batch > 1 condition; CPU only, as no other backend was measured
# (docs/guides/benchmarks.md, "Generation with the decoder-only LM").
def _one_query_logits(query: Array, key: Array, precision, cdt) -> Array:
    """``query [..., 1, N, H]``, ``key [..., S, K, H]`` -> unscaled logits ``[..., N, 1, S]``."""
    *batch, t, n, h = query.shape
    s, k = key.shape[-3], key.shape[-2]
    every = jnp.einsum("...xh,...qh->...xq", key.reshape(*batch, s * k, h), query.reshape(*batch, n, h),
                       precision=precision, preferred_element_type=cdt).reshape(*batch, s, k, n)
    # A select, not a product: a discarded cross-head logit never reaches the sum.
    logits = jnp.sum(jnp.where(_own_head(n, k).T, every, 0), axis=-2)  # [..., S, N]
    return jnp.swapaxes(logits, -1, -2)[..., :, None, :]


def _one_query_values(probs: Array, value: Array, precision, cdt) -> Array:
    """``probs [..., N, 1, S]``, ``value [..., S, K, D]`` -> ``[..., N, D]`` in ``cdt``."""
    *batch, n, _, s = probs.shape
    k, d = value.shape[-2:]
    p = jnp.swapaxes(probs[..., 0, :], -1, -2)  # [..., S, N]
    spread = jnp.where(_own_head(n, k).T, p[..., None, :], 0).reshape(*batch, s * k, n)
    return jnp.einsum("...xq,...xd->...qd", spread, value.reshape(*batch, s * k, d),
                      precision=precision, preferred_element_type=cdt)


def _describe(query, key, value, mask, bias, scale, is_causal, causal_alignment, window,
              dropout_active, return_weights) -> AttentionCall:
    """The static facts about a call that implementation choice depends on.

    Sizes are logical: under ``jax.vmap`` the enclosing vmapped axes count
    as batch. Forward-mode and gradient-of-gradient autodiff both need the
    dense path (``forward_mode``): every other path is a once-differentiable
    ``custom_vjp``.
    """
    vmapped = (vmapped_size(),)
    return describe(
        vmapped + query.shape, vmapped + key.shape, vmapped + value.shape, query.dtype,
        platform=jax.default_backend(), has_mask=mask is not None, has_bias=bias is not None,
        is_causal=bool(is_causal), alignment=causal_alignment, has_window=window is not None,
        dropout=dropout_active, return_weights=bool(return_weights),
        forward_mode=forward_mode_active() or nested_reverse_mode_active(),
        static_scale=scale is None or isinstance(scale, (int, float, np.integer, np.floating)))


def scaled_dot_product_attention(
    query: Array,
    key: Array,
    value: Optional[Array] = None,
    *,
    mask: Optional[Array] = None,
    bias: Optional[Array] = None,
    scale: Optional[float] = None,
    is_causal: bool = False,
    causal_alignment: str = "bottom_right",
    dropout_rate: float = 0.0,
    dropout_rng: Optional[jax.Array] = None,
    deterministic: bool = True,
    return_weights: bool = False,
    precision=None,
    window=None,
    implementation: Optional[str] = None,
):
    """Scaled dot-product attention, ``softmax(Q Kᵀ / √H) V`` (Vaswani et al., Eq. 1).

    Logits and softmax are computed in at least float32 and at least the
    input precision (bfloat16/float16 -> float32, float64 -> float64); the
    output has the query's dtype. ``query``, ``key`` and ``value`` must share
    one floating dtype (like ``jax.nn.dot_product_attention`` and PyTorch;
    cast explicitly). Array-likes such as lists go through ``jnp.asarray``.
    Supports grouped/multi-query kv heads (``N % K == 0``), a value head dim
    ``D`` different from ``H``, and any number of leading batch dims. ``S = 0``
    (no keys) gives zeros, ``T = 0`` an empty output.

    Args:
      query: ``[..., T, N, H]``.
      key: ``[..., S, K, H]``.
      value: ``[..., S, K, D]``; ``None`` means key = value.
      mask: boolean, broadcastable to ``[..., N, T, S]``; ``True`` = attend.
        Rows with nothing to attend to output zeros.
      bias: float, broadcastable to ``[..., N, T, S]``, added to the logits.
      scale: logit scale, a float or a (traced, differentiable) scalar;
        defaults to ``1 / sqrt(H)``.
      is_causal: apply a causal mask (combined with ``mask``).
      causal_alignment: ``"bottom_right"`` (default: the queries are the last
        ``T`` positions) or ``"top_left"`` when ``T != S``.
      dropout_rate: dropout on the attention weights.
      dropout_rng: PRNG key, required when dropout is active.
      deterministic: disables dropout when ``True``.
      return_weights: also return the (pre-dropout) weights.
      precision: passed to both einsums.
      window: sliding window ``w`` (the query and its ``w`` predecessors) or
        ``(left, right)``, as in :func:`~flax_attention.functional.masks.sliding_window_mask`,
        aligned by ``causal_alignment``; combined with ``mask``.
      implementation: ``"dense"`` materialises the ``[..., N, T, S]``
        logits; ``"chunked"`` runs :func:`~flax_attention.kernels.flash.chunked_attention`
        (online softmax, ``O(T + S)`` memory, skips blocks hidden by
        ``is_causal``/``window``; no dropout, no returned weights, reverse-mode
        autodiff only). ``None`` (auto) picks ``"chunked"`` when the dense
        float32 logits would exceed ``AUTO_CHUNKED_BYTES`` (256 MiB, i.e.
        ``4·B·N·T·S`` bytes) or, on CPU, where it is measured faster (``T``
        and ``S`` >= ``CPU_CHUNKED_MIN_LENGTH`` = 512), unless dropout,
        ``return_weights``, forward-mode autodiff (``jax.jvp``, ``jacfwd``,
        ``hessian``) or a gradient of a gradient needs the dense path; so
        auto never changes what works, only speed and memory. Under
        ``jax.vmap`` sizes count the vmapped axes (the logical batch), so the
        choice is the one for the batched call. (Exceptions, as these are
        read at trace time: ``jax.linearize`` looks like ``jax.grad``, and a
        ``jit``-compiled function traced outside ``grad``/``vmap`` is reused
        as traced; where auto would pick ``"chunked"`` or ``"cudnn"`` for those, pass
        ``implementation="dense"``.)
        Fused kernels, opt-in (see :mod:`flax_attention.kernels.backends`):
        ``"cudnn"`` (GPU, float16/bfloat16), ``"pallas_triton"`` (GPU; no
        mask, bias or window), ``"pallas_tpu"`` (TPU; masks, bias and windows
        travel as a materialised ``[B, N, T, S]`` bias), ``"tokamax_triton"``
        (GPU) and ``"tokamax_mosaic"`` (GPU/TPU; optional package tokamax).
        They keep every guarantee above (dead rows give zeros and finite
        gradients, bottom-right alignment, GQA, ``D != H``) or raise
        ``ValueError`` naming what they cannot do and what to use instead;
        none takes dropout, ``return_weights`` or forward-mode autodiff.
        Append ``":interpret"`` to a Pallas kernel's name (e.g.
        ``"pallas_tpu:interpret"``) to run it in JAX's interpret mode on any
        platform, for tests. Auto picks a kernel only where it is listed
        as measured for the platform
        (:data:`flax_attention.kernels.backend_select.MEASURED`): on GPU, float16/
        bfloat16 calls that cuDNN accepts take ``"cudnn"`` (on published
        H100 figures, see ``MEASURED_SOURCES``); every other call, and every
        call on CPU/TPU, takes the XLA rule above.

    Returns:
      ``[..., T, N, D]`` in the query's dtype, or ``(output, weights)`` with
      weights ``[..., N, T, S]`` in the compute dtype if ``return_weights``.

    Raises:
      ValueError: on mismatched shapes, indivisible heads, non-float or
        mixed-dtype ``query``/``key``/``value``, a non-boolean mask, a boolean
        bias, an unknown alignment, a dropout rate outside [0, 1), an unknown
        implementation, or one that cannot serve the call on this platform.

    Examples:
      Grouped-query attention (8 query heads read 2 kv heads), causal, with a
      batch element whose keys are all padding (its output is zeros):

      >>> import jax, jax.numpy as jnp
      >>> import flax_attention as fa
      >>> q = jnp.ones((2, 3, 8, 16))                  # [B, T, N, H]
      >>> kv = jnp.ones((2, 5, 2, 16))                 # [B, S, K, H]
      >>> mask = fa.key_mask(fa.padding_mask(jnp.array([5, 0]), 5))
      >>> out = fa.scaled_dot_product_attention(q, kv, kv, mask=mask, is_causal=True)
      >>> out.shape, float(jnp.abs(out[1]).max())
      ((2, 3, 8, 16), 0.0)

      Low precision in, the softmax in float32, the input dtype out:

      >>> fa.scaled_dot_product_attention(q.astype(jnp.bfloat16), kv.astype(jnp.bfloat16)).dtype
      dtype(bfloat16)
    """
    query, key, value, mask, bias, bias_keep = prepare(query, key, value, mask, bias, scale)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")
    check_alignment(causal_alignment)  # checked even when unused: a typo is a bug
    call = _describe(query, key, value, mask, bias, scale, is_causal, causal_alignment, window,
                     dropout_rate > 0.0 and not deterministic, return_weights)
    implementation, interpret = resolve(implementation, call, AUTO_CHUNKED_BYTES)
    if implementation not in ("dense", "chunked"):
        return fused_attention(implementation, query, key, value, mask, bias, bias_keep, scale, is_causal,
                               causal_alignment, window, precision, interpret)
    if implementation == "chunked":
        return _chunked(query, key, value, mask, bias, bias_keep, scale, is_causal,
                        causal_alignment, window, None, None, precision)
    mask = combine_masks(mask, bias_keep)
    if window is not None:
        mask = combine_masks(mask, sliding_window_mask(
            query.shape[-3], key.shape[-3], window=window, alignment=causal_alignment))
    weights = _dense_weights(query, key, mask, bias, scale, is_causal, causal_alignment, precision)
    probs = weights
    if dropout_rate > 0.0 and not deterministic:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 with deterministic=False needs a dropout_rng key.")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    *batch, t, n, _ = query.shape
    s, k, d = value.shape[-3:]
    g = n // k
    if _one_query(query.shape, k):
        out = _one_query_values(probs.astype(value.dtype), value, precision, weights.dtype)
    else:
        probs = probs.reshape(*batch, k, g * t, s).astype(value.dtype)  # same Q = G·T fold
        out = jnp.einsum(
            "...kqs,...skd->...kqd", probs, value,
            precision=precision, preferred_element_type=weights.dtype,
        )
        out = jnp.moveaxis(out.reshape(*batch, k, g, t, d), -2, -4)  # [..., T, K, G, D]
    out = out.reshape(*batch, t, n, d).astype(query.dtype)
    return (out, weights) if return_weights else out
