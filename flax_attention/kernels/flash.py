"""Memory-efficient (chunked, online-softmax) scaled dot-product attention.

Same maths as :func:`flax_attention.functional.attention.scaled_dot_product_attention`,
but the ``[..., N, T, S]`` logits are never materialised. Queries are split into
blocks of ``block_q`` rows and keys into blocks of ``block_k`` columns; each
query block streams over its key blocks keeping a running row maximum ``m``,
normaliser ``l`` and un-normalised output (online softmax; Rabe & Staats 2021,
FlashAttention, Dao et al. 2022, Alg. 1). Memory is ``O(T + S)``, not ``O(T·S)``.

The backward pass (``jax.custom_vjp``) keeps only the inputs, the output ``O``
and the per-row log-sum-exp ``L``; it recomputes every block's probabilities
``P = exp(Q Kᵀ·scale + bias − L)`` and applies FlashAttention's gradient
(Dao et al. 2022, Alg. 2 / Eq. in App. B.2):
``dV = Pᵀ dO``, ``dP = dO Vᵀ``, ``dS = P ∘ (dP − rowsum(dO ∘ O))``,
``dQ = dS K·scale``, ``dK = dSᵀ Q·scale``, ``dbias = dS``.

Block skipping: the causal/sliding-window structure is static, so
:func:`block_plan` lists per query block the contiguous range of key blocks
holding a visible key (and the transpose for the backward); loops
(``lax.fori_loop`` with per-block bounds) visit only those.

Lengths that are not multiples of the block sizes are padded internally and
the padded keys are masked out structurally (the published Rabe & Staats
reference lets padded keys enter the softmax). Rows that see no key return
zeros with finite gradients, exactly like the dense path. Masked logits hold a
finite fill (dtype minimum) and probabilities are zeroed through a boolean
``keep``, so no infinity is ever created. Softmax statistics use the compute
dtype: float32, or float64 for float64 inputs.

The loops live in :mod:`flax_attention.kernels._flash_passes` (the backward works on
transposed ``K Qᵀ`` tiles so that XLA:CPU runs every block product through its
fast matmul path), the block tiles in :mod:`flax_attention.kernels._flash_tiles`, the
static block planning in :mod:`flax_attention.kernels._blocks`.

Internal layout: the ``G = N // K`` query heads that share a kv head are folded
into the row axis, ``q [B, K, T, G, H] -> [B, K, T·G, H]`` per block, so every
block product is one batched matmul over ``(B, K)`` and K/V are never repeated.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from flax_attention.kernels._blocks import (  # noqa: F401  (re-exported: part of this module's API)
    DEFAULT_BLOCK,
    DEFAULT_BLOCK_ACCELERATOR,
    Window,
    band,
    block_plan,
    block_size,
    block_sizes,
    default_block_edges,
    computed_blocks,
    default_block_size,
)
from flax_attention.kernels._flash_passes import _backward, _forward
from flax_attention.kernels._flash_tiles import _Config
from flax_attention.core.checks import prepare, static_int
from flax_attention.core.dtypes import compute_dtype
from flax_attention.core.tracing import forward_mode_active

Array = jnp.ndarray


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, mask, bias, bias_keep, scale, cfg):
    return _forward(q, k, v, mask, bias, bias_keep, scale, cfg)[0]


def _flash_fwd(q, k, v, mask, bias, bias_keep, scale, cfg):
    out, lse = _forward(q, k, v, mask, bias, bias_keep, scale, cfg)
    return out, (q, k, v, mask, bias, bias_keep, scale, out, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, mask, bias, bias_keep, scale, out, lse = res
    dq, dk, dv, dbias, dscale = _backward(q, k, v, mask, bias, bias_keep, scale, out, lse, do, cfg)
    return dq, dk, dv, None, dbias, None, dscale


_flash.defvjp(_flash_fwd, _flash_bwd)
# Jitted on its static config, so eager callers compile the loops once per shape
# rather than on every call; under an outer jit this simply inlines. The scale
# is an array operand: it may be traced, and it gets a gradient.
_flash_jit = jax.jit(_flash, static_argnums=(7,))


# ----------------------------------------------------------------------------- public API


def _normalize(x, batch, kh, g, t, s, tp, sp, fill):
    """Mask/bias broadcastable to ``[..., N, T, S]`` -> ``[Bx, Kx, Tx, Gx, Sx]``, padded.

    Each axis is either 1 (broadcast; never materialised) or full. Autodiff of
    these reshapes/pads sums a bias gradient back to the caller's shape.
    """
    if x is None:
        return None
    nb = len(batch)
    x = x.reshape((1,) * (nb + 3 - x.ndim) + x.shape)
    if all(e == 1 for e in x.shape[:nb]):
        x = x.reshape((1,) + x.shape[nb:])
    else:
        x = jnp.broadcast_to(x, tuple(batch) + x.shape[nb:]).reshape((-1,) + x.shape[nb:])
    bx, nx, tx, sx = x.shape
    x = x.reshape(bx, kh if nx > 1 else 1, g if nx > 1 else 1, tx, sx).transpose(0, 1, 3, 2, 4)
    pad_t = tp - t if tx > 1 else 0
    pad_s = sp - s if sx > 1 else 0
    if pad_t or pad_s:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, pad_t), (0, 0), (0, pad_s)), constant_values=fill)
    return x


def chunked_attention(
    query: Array,
    key: Array,
    value: Optional[Array] = None,
    *,
    mask: Optional[Array] = None,
    bias: Optional[Array] = None,
    scale: Optional[float] = None,
    is_causal: bool = False,
    causal_alignment: str = "bottom_right",
    window: Optional[Window] = None,
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
    precision=None,
) -> Array:
    """Memory-efficient ``softmax(Q Kᵀ · scale + bias) V`` with block skipping.

    Same arguments and results (to float32 rounding) as
    :func:`~flax_attention.functional.attention.scaled_dot_product_attention`, without
    dropout or returned weights; peak memory is ``O(block_q · block_k)`` per
    head instead of ``O(T · S)``. Differentiable in ``query``, ``key``,
    ``value``, ``bias`` and ``scale`` via a recomputing ``custom_vjp``.

    Args:
      query: ``[..., T, N, H]``.
      key: ``[..., S, K, H]`` with ``N % K == 0`` (K/V are never repeated).
      value: ``[..., S, K, D]``; ``None`` means key = value.
      mask: boolean, broadcastable to ``[..., N, T, S]``; ``True`` = attend.
        Sliced per block; keep broadcast axes as size 1 to save memory.
      bias: float, broadcastable to ``[..., N, T, S]``; sliced per block.
      scale: logit scale, a Python float or a (traced, differentiable) scalar;
        defaults to ``1 / sqrt(H)``.
      is_causal: causal mask, applied structurally: key blocks entirely in
        the future of a query block are skipped.
      causal_alignment: ``"bottom_right"`` or ``"top_left"`` when ``T != S``
        (see :func:`~flax_attention.core.masks.causal_mask`).
      window: sliding window, as in
        :func:`~flax_attention.core.masks.sliding_window_mask`: ``w`` = the query
        and its ``w`` predecessors, ``(left, right)`` = a two-sided band.
        Uses ``causal_alignment``; blocks outside the band are skipped.
      block_q, block_k: block sizes (static); default: the length split into
        equal blocks of at most :func:`default_block_edges` (on CPU 128 to
        256 x 512, growing until a block step holds ~1M logits over all
        ``B·N`` heads; 512 on accelerators), rounded up to a multiple of 8.
      precision: passed to every block matmul.

    Returns:
      ``[..., T, N, D]`` in the query's dtype. Rows that see no key (including
      every row when ``S = 0``) are zeros; ``T = 0`` gives an empty output.

    Raises:
      ValueError: on bad shapes, non-float or mixed-dtype ``query``/``key``/``value``,
        a non-boolean mask, a negative or non-int window or block size, an
        unknown alignment, or forward-mode autodiff (``jax.jvp``, ``jacfwd``,
        ``hessian``: the ``custom_vjp`` defines reverse mode only; the dense
        path, which auto dispatch falls back to under forward mode, has both).

    Examples:
      The same attention as the dense path, in O(T + S) memory; blocks hidden
      by the causal window are never computed:

      >>> import jax, jax.numpy as jnp
      >>> import flax_attention as fa
      >>> q = jax.random.normal(jax.random.key(0), (1, 300, 4, 32))
      >>> out = fa.chunked_attention(q, q, q, is_causal=True, window=64)
      >>> ref = fa.scaled_dot_product_attention(q, q, q, is_causal=True, window=64,
      ...                                       implementation="dense")
      >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
      ((1, 300, 4, 32), True)
    """
    query, key, value, mask, bias, bias_keep = prepare(query, key, value, mask, bias, scale)
    return _chunked(query, key, value, mask, bias, bias_keep, scale, is_causal, causal_alignment,
                    window, block_q, block_k, precision)


def _chunked(query, key, value, mask, bias, bias_keep, scale, is_causal, causal_alignment,
             window, block_q, block_k, precision):
    """:func:`chunked_attention` on operands already through ``prepare``."""
    *batch, t, n, h = query.shape
    s, kh, d = value.shape[-3:]
    g = n // kh
    bsz = math.prod(batch)
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size is not None:
            static_int(size, name, minimum=1)
    offset, left, right = band(t, s, is_causal, causal_alignment, window)
    if t == 0 or s == 0:  # nothing to attend to (or nobody asking): zeros, zero gradients
        return jnp.zeros((*batch, t, n, d), query.dtype)
    bq, bk = block_sizes(block_q, block_k, t, s, bsz * n, left is not None or right is not None)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    cdt = compute_dtype(query.dtype)
    scale = jnp.asarray(1.0 / math.sqrt(h) if scale is None else scale, cdt)

    q = query.reshape(bsz, t, kh, g, h).transpose(0, 2, 1, 3, 4)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, tp - t), (0, 0), (0, 0)))
    k = jnp.pad(key.reshape(bsz, s, kh, h).transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    v = jnp.pad(value.reshape(bsz, s, kh, d).transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    mask = _normalize(mask, batch, kh, g, t, s, tp, sp, False)
    bias = _normalize(bias, batch, kh, g, t, s, tp, sp, 0)
    bias_keep = _normalize(bias_keep, batch, kh, g, t, s, tp, sp, False)
    cfg = _Config(t, s, bq, bk, offset, left, right, precision)
    try:
        out = _flash_jit(q, k, v, mask, bias, bias_keep, scale, cfg)  # [B, K, Tp, G, D]
    except TypeError as err:
        if not forward_mode_active():
            raise
        raise ValueError(
            "chunked_attention supports reverse-mode autodiff only (grad, vjp), not forward "
            "mode (jax.jvp, jacfwd, hessian); use implementation='dense', or None (auto), "
            "which takes the dense path under forward-mode autodiff."
        ) from err
    return out[:, :, :t].transpose(0, 2, 1, 3, 4).reshape(*batch, t, n, d)
