"""Memory-efficient (chunked, online-softmax) scaled dot-product attention.

Same maths as :func:`flax_attention.attention.scaled_dot_product_attention`,
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

Internal layout: the ``G = N // K`` query heads that share a kv head are folded
into the row axis, ``q [B, K, T, G, H] -> [B, K, T·G, H]`` per block, so every
block product is one batched matmul over ``(B, K)`` and K/V are never repeated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from flax_attention._blocks import (  # noqa: F401  (re-exported: part of this module's API)
    DEFAULT_BLOCK,
    DEFAULT_BLOCK_ACCELERATOR,
    Window,
    band,
    block_plan,
    block_size,
    computed_blocks,
    default_block_size,
)
from flax_attention._validation import compute_dtype, forward_mode_active, mask_fill, prepare, static_int

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of one call (hashable: a ``custom_vjp`` nondiff arg)."""

    t: int  # real (unpadded) lengths
    s: int
    block_q: int
    block_k: int
    offset: int
    left: Optional[int]
    right: Optional[int]
    precision: object = None

    @property
    def plan(self):
        # int32 bounds and block indices: under 64-bit mode a Python-int loop
        # bound would make an int64 index, and dynamic slices reject mixed types.
        return tuple(jnp.asarray(a, jnp.int32) for a in block_plan(
            self.t, self.s, self.block_q, self.block_k,
            offset=self.offset, left=self.left, right=self.right))


# ----------------------------------------------------------------------------- block maths


def _idx(starts):
    """Slice start indices as int32: in 64-bit mode a Python 0 would become int64,
    and dynamic slices reject mixed index types."""
    return tuple(jnp.asarray(x, jnp.int32) for x in starts)


def _block(x: Optional[Array], i, j, cfg: _Config):
    """Slices block ``(i, j)`` of a mask/bias ``[Bx, Kx, Tx, Gx, Sx]`` (each axis 1 or full)."""
    if x is None:
        return None
    # Broadcast is decided by the array's axis, never by the block size: with
    # block_q = 1 a full T axis must still be sliced at row i, not read at 0.
    full_t, full_s = x.shape[2] > 1, x.shape[4] > 1
    starts = (0, 0, i * cfg.block_q if full_t else 0, 0, j * cfg.block_k if full_s else 0)
    sizes = (x.shape[0], x.shape[1], cfg.block_q if full_t else 1, x.shape[3], cfg.block_k if full_s else 1)
    return lax.dynamic_slice(x, _idx(starts), sizes)


def _scores(q_i, k_j, mask, bias, bias_keep, scale, i, j, cfg: _Config):
    """Scaled, biased, masked logits of block ``(i, j)``: ``[B, K, bq·G, bk]``, and ``keep``.

    Logits are in ``scale.dtype`` (the compute dtype). Masked entries hold the
    finite :func:`mask_fill` (no infinity is created, so ``jax.debug_infs``
    stays quiet); ``keep`` (boolean, same shape, or ``None`` if every entry is
    kept) tells callers which probabilities to zero.
    """
    b, kh, rows, _ = q_i.shape
    bq, bk = cfg.block_q, cfg.block_k
    g = rows // bq
    s = jnp.einsum("bkrh,bksh->bkrs", q_i, k_j, precision=cfg.precision,
                   preferred_element_type=scale.dtype) * scale
    s = s.reshape(b, kh, bq, g, bk)
    keep = _block(mask, i, j, cfg)
    if bias is not None:  # finite: `prepare` moved -inf entries to bias_keep
        s = s + _block(bias, i, j, cfg).astype(s.dtype)
        keep = _block(bias_keep, i, j, cfg) if keep is None else keep & _block(bias_keep, i, j, cfg)
    # Structural mask from positions: causal/window band and padded keys.
    q_pos = i * bq + jnp.arange(bq, dtype=jnp.int32) + cfg.offset
    k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)
    diff = q_pos[:, None, None] - k_pos[None, None, :]  # [bq, 1, bk]
    conds = []
    if cfg.left is not None:
        conds.append(diff <= cfg.left)
    if cfg.right is not None:
        conds.append(diff >= -cfg.right)
    if cfg.s % bk:
        conds.append(k_pos[None, None, :] < cfg.s)
    for c in conds:
        keep = c if keep is None else keep & c
    if keep is None:
        return s.reshape(b, kh, bq * g, bk), None
    keep = jnp.broadcast_to(keep, s.shape)
    s = jnp.where(keep, s, mask_fill(s.dtype))
    return s.reshape(b, kh, bq * g, bk), keep.reshape(b, kh, bq * g, bk)


def _rows(x, i, block_q):
    """Query block ``i`` of ``[B, K, T, G, ...]`` as ``[B, K, block_q·G, ...]``."""
    starts = (0, 0, i * block_q) + (0,) * (x.ndim - 3)
    blk = lax.dynamic_slice(x, _idx(starts), x.shape[:2] + (block_q,) + x.shape[3:])
    return blk.reshape(x.shape[:2] + (block_q * x.shape[3],) + x.shape[4:])


def _cols(x, j, block_k):
    """Key block ``j`` of ``[B, K, S, X]``."""
    return lax.dynamic_slice(x, _idx((0, 0, j * block_k, 0)), x.shape[:2] + (block_k,) + x.shape[3:])


def _put_rows(x, blk, i, block_q):
    """Writes ``[B, K, block_q·G, ...]`` back into query block ``i`` of ``x``."""
    blk = blk.reshape(x.shape[:2] + (block_q,) + x.shape[3:])
    return lax.dynamic_update_slice(x, blk.astype(x.dtype), _idx((0, 0, i * block_q) + (0,) * (x.ndim - 3)))


def _forward(q, k, v, mask, bias, bias_keep, scale, cfg: _Config):
    """Online-softmax forward. ``q [B,K,Tp,G,H]``, ``k [B,K,Sp,H]``, ``v [B,K,Sp,D]``.

    Returns ``out [B,K,Tp,G,D]`` (input dtype) and ``lse [B,K,Tp,G]`` in the
    compute dtype (``scale.dtype``); ``lse`` is 0 on rows that see no key, whose
    probabilities are zeroed through ``keep`` instead.
    """
    b, kh, tp, g, _ = q.shape
    d = v.shape[-1]
    cdt = scale.dtype
    kv_lo, kv_hi, _, _ = cfg.plan
    rows = cfg.block_q * g

    def q_block(i, carry):
        out, lse = carry
        q_i = _rows(q, i, cfg.block_q)

        def kv_step(j, state):
            m, l, acc = state
            s, keep = _scores(q_i, _cols(k, j, cfg.block_k), mask, bias, bias_keep, scale, i, j, cfg)
            m_new = jnp.maximum(m, s.max(-1))  # finite: masked entries hold mask_fill
            p = jnp.exp(s - m_new[..., None])
            if keep is not None:
                p = jnp.where(keep, p, 0)  # also covers rows with nothing kept yet (m_new = fill)
            # Rescales the old statistics (Alg. 1, line 10); while nothing was seen
            # (l = 0, acc = 0) use factor 1 so a fill-valued m never enters the exp.
            alpha = jnp.exp(jnp.where(l > 0, m, m_new) - m_new)
            pv = jnp.einsum("bkrs,bksd->bkrd", p.astype(v.dtype), _cols(v, j, cfg.block_k),
                            precision=cfg.precision, preferred_element_type=cdt)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        init = (jnp.full((b, kh, rows), mask_fill(cdt), cdt),
                jnp.zeros((b, kh, rows), cdt),
                jnp.zeros((b, kh, rows, d), cdt))
        m, l, acc = lax.fori_loop(kv_lo[i], kv_hi[i], kv_step, init)
        seen = l > 0
        safe_l = jnp.where(seen, l, 1)
        o_i = acc / safe_l[..., None]  # acc is 0 where nothing was seen
        lse_i = jnp.where(seen, m + jnp.log(safe_l), 0)
        return _put_rows(out, o_i, i, cfg.block_q), _put_rows(lse, lse_i, i, cfg.block_q)

    init = (jnp.zeros((b, kh, tp, g, d), q.dtype), jnp.zeros((b, kh, tp, g), cdt))
    return lax.fori_loop(jnp.int32(0), jnp.int32(tp // cfg.block_q), q_block, init)


def _backward(q, k, v, mask, bias, bias_keep, scale, out, lse, do, cfg: _Config):
    """Recomputing backward: key blocks outer (dK, dV in registers), query blocks inner."""
    b, kh, tp, g, h = q.shape
    sp, d = v.shape[-2], v.shape[-1]
    cdt = scale.dtype
    _, _, q_lo, q_hi = cfg.plan
    # rowsum(dO ∘ O) (FlashAttention-2's D_i): the softmax Jacobian's diagonal term.
    delta = jnp.einsum("bktgd,bktgd->bktg", do.astype(cdt), out.astype(cdt))

    def kv_block(j, carry):
        dq, dk, dv, dbias = carry
        k_j, v_j = _cols(k, j, cfg.block_k), _cols(v, j, cfg.block_k)

        def q_step(i, state):
            dk_j, dv_j, dq, dbias = state
            q_i, do_i = _rows(q, i, cfg.block_q), _rows(do, i, cfg.block_q)
            s, keep = _scores(q_i, k_j, mask, bias, bias_keep, scale, i, j, cfg)
            p = jnp.exp(s - _rows(lse, i, cfg.block_q)[..., None])
            if keep is not None:
                p = jnp.where(keep, p, 0)
            dv_j = dv_j + jnp.einsum("bkrs,bkrd->bksd", p.astype(do.dtype), do_i,
                                     precision=cfg.precision, preferred_element_type=cdt)
            dp = jnp.einsum("bkrd,bksd->bkrs", do_i, v_j,
                            precision=cfg.precision, preferred_element_type=cdt)
            ds = p * (dp - _rows(delta, i, cfg.block_q)[..., None])
            ds_c = ds.astype(q.dtype)
            dq_i = jnp.einsum("bkrs,bksh->bkrh", ds_c, k_j,
                              precision=cfg.precision, preferred_element_type=cdt)
            dq = _put_rows(dq, _rows(dq, i, cfg.block_q) + dq_i, i, cfg.block_q)
            dk_j = dk_j + jnp.einsum("bkrs,bkrh->bksh", ds_c, q_i,
                                     precision=cfg.precision, preferred_element_type=cdt)
            if dbias is not None:
                dbias = _add_bias_block(dbias, ds, i, j, cfg)
            return dk_j, dv_j, dq, dbias

        init = (jnp.zeros((b, kh, cfg.block_k, h), cdt), jnp.zeros((b, kh, cfg.block_k, d), cdt),
                dq, dbias)
        dk_j, dv_j, dq, dbias = lax.fori_loop(q_lo[j], q_hi[j], q_step, init)
        start = _idx((0, 0, j * cfg.block_k, 0))
        return (dq, lax.dynamic_update_slice(dk, dk_j, start),
                lax.dynamic_update_slice(dv, dv_j, start), dbias)

    init = (jnp.zeros((b, kh, tp, g, h), cdt), jnp.zeros((b, kh, sp, h), cdt),
            jnp.zeros((b, kh, sp, d), cdt),
            None if bias is None else jnp.zeros(bias.shape, cdt))
    dq, dk, dv, dbias = lax.fori_loop(jnp.int32(0), jnp.int32(sp // cfg.block_k), kv_block, init)
    # d(logits)/dQ = scale·K: applied once, after the sums. d(logits)/d(scale) =
    # Q·Kᵀ, so d(scale) = Σ dS ∘ QKᵀ = Σ Q ∘ (dS K) = Σ Q ∘ dq (unscaled dq).
    dscale = jnp.sum(dq * q.astype(cdt)).astype(scale.dtype)
    return ((dq * scale).astype(q.dtype), (dk * scale).astype(k.dtype), dv.astype(v.dtype),
            None if bias is None else dbias.astype(bias.dtype), dscale)


def _add_bias_block(dbias, ds, i, j, cfg: _Config):
    """Accumulates ``dS`` of block ``(i, j)`` into ``dbias``, summing broadcast axes."""
    b, kh, rows, bk = ds.shape
    ds = ds.reshape(b, kh, cfg.block_q, rows // cfg.block_q, bk)
    axes = tuple(a for a in range(5) if dbias.shape[a] == 1 and ds.shape[a] > 1)
    ds = ds.sum(axes, keepdims=True) if axes else ds
    starts = (0, 0, i * cfg.block_q if dbias.shape[2] > 1 else 0, 0,
              j * cfg.block_k if dbias.shape[4] > 1 else 0)
    starts = _idx(starts)
    old = lax.dynamic_slice(dbias, starts, ds.shape)
    return lax.dynamic_update_slice(dbias, old + ds, starts)


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
    :func:`~flax_attention.attention.scaled_dot_product_attention`, without
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
        (see :func:`~flax_attention.masks.causal_mask`).
      window: sliding window, as in
        :func:`~flax_attention.masks.sliding_window_mask`: ``w`` = the query
        and its ``w`` predecessors, ``(left, right)`` = a two-sided band.
        Uses ``causal_alignment``; blocks outside the band are skipped.
      block_q, block_k: block sizes (static); default: the length split into
        equal blocks of at most :func:`default_block_size` (128 on CPU, 512 on
        accelerators), rounded up to a multiple of 8.
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
    """
    query, key, value, mask, bias, bias_keep = prepare(query, key, value, mask, bias)
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
    bq, bk = block_size(block_q, t, "block_q"), block_size(block_k, s, "block_k")
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
