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
zeros with finite gradients, exactly like the dense path. Softmax statistics
are float32 for every input dtype.

Internal layout: the ``G = N // K`` query heads that share a kv head are folded
into the row axis, ``q [B, K, T, G, H] -> [B, K, T·G, H]`` per block, so every
block product is one batched matmul over ``(B, K)`` and K/V are never repeated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flax_attention.attention import _check_inputs
from flax_attention.masks import _ALIGNMENTS, _window_sizes

Array = jnp.ndarray
Window = Union[int, Tuple[int, int]]

# Default block edge per backend. On CPU, 128x128 blocks per head (64 KiB of
# float32 logits) stay in L2 and measured the least CPU time per FLOP on the
# 2-core benchmark machine; accelerators prefer fewer, larger blocks because
# every loop step is a kernel launch.
DEFAULT_BLOCK = {"cpu": 128}
DEFAULT_BLOCK_ACCELERATOR = 512


def default_block_size() -> int:
    """The default ``block_q``/``block_k`` for the current default JAX backend."""
    return DEFAULT_BLOCK.get(jax.default_backend(), DEFAULT_BLOCK_ACCELERATOR)


# ----------------------------------------------------------------------------- planning


def _band(t: int, s: int, is_causal: bool, alignment: str, window: Optional[Window]):
    """Structural visibility as a band on ``diff = q_pos - k_pos``.

    Returns ``(offset, left, right)``: query row ``r`` sits at position
    ``r + offset`` and sees key ``c`` iff ``-right <= r + offset - c <= left``
    (``None`` = unbounded). Causal is ``right = 0``; a window ``(left, right)``
    follows :func:`flax_attention.masks.sliding_window_mask`.
    """
    if alignment not in _ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {_ALIGNMENTS}, got {alignment!r}.")
    offset = s - t if alignment == "bottom_right" else 0
    left, right = (None, None) if window is None else _window_sizes(window)
    if is_causal:
        right = 0 if right is None else min(right, 0)
    return offset, left, right


def block_plan(
    t: int, s: int, block_q: int, block_k: int, *,
    offset: int = 0, left: Optional[int] = None, right: Optional[int] = None,
):
    """Static list of the (query block, key block) pairs that must be computed.

    A block is needed iff it holds a pair ``(r, c)`` with
    ``-right <= r + offset - c <= left``, ``r < t``, ``c < s``. The needed key
    blocks of a query block are contiguous (and vice versa), so the plan is a
    pair of half-open ranges per block.

    ``offset, left, right`` describe the band (``None`` = unbounded side).

    Returns:
      ``(kv_lo, kv_hi, q_lo, q_hi)`` int32 NumPy arrays: query block ``i``
      visits key blocks ``kv_lo[i] <= j < kv_hi[i]``; key block ``j`` is
      visited by query blocks ``q_lo[j] <= i < q_hi[j]``. The number of
      computed blocks is ``sum(kv_hi - kv_lo) == sum(q_hi - q_lo)``.
    """
    nq, nk = -(-t // block_q), -(-s // block_k)
    big = t + s + 1  # "unbounded" that stays an exact int
    left = big if left is None else left
    right = big if right is None else right
    kv_lo, kv_hi = np.zeros(nq, np.int32), np.zeros(nq, np.int32)
    for i in range(nq):
        r0, r1 = i * block_q, min((i + 1) * block_q, t) - 1
        c0, c1 = max(r0 + offset - left, 0), min(r1 + offset + right, s - 1)
        if c0 <= c1:
            kv_lo[i], kv_hi[i] = c0 // block_k, c1 // block_k + 1
    q_lo, q_hi = np.zeros(nk, np.int32), np.zeros(nk, np.int32)
    for j in range(nk):
        c0, c1 = j * block_k, min((j + 1) * block_k, s) - 1
        r0, r1 = max(c0 - offset - right, 0), min(c1 - offset + left, t - 1)
        if r0 <= r1:
            q_lo[j], q_hi[j] = r0 // block_q, r1 // block_q + 1
    return kv_lo, kv_hi, q_lo, q_hi


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
    scale: float
    precision: object = None

    @property
    def plan(self):
        return block_plan(self.t, self.s, self.block_q, self.block_k,
                          offset=self.offset, left=self.left, right=self.right)


# ----------------------------------------------------------------------------- block maths


def _block(x: Optional[Array], i, j, cfg: _Config):
    """Slices block ``(i, j)`` of a mask/bias ``[Bx, Kx, Tx, Gx, Sx]`` (1 or full)."""
    if x is None:
        return None
    bq = cfg.block_q if x.shape[2] > 1 else 1
    bk = cfg.block_k if x.shape[4] > 1 else 1
    starts = (0, 0, i * cfg.block_q if bq > 1 else 0, 0, j * cfg.block_k if bk > 1 else 0)
    return lax.dynamic_slice(x, starts, (x.shape[0], x.shape[1], bq, x.shape[3], bk))


def _scores(q_i, k_j, mask, bias, i, j, cfg: _Config):
    """Scaled, biased, masked float32 logits of block ``(i, j)``: ``[B, K, bq·G, bk]``.

    Masked entries are ``-inf`` (filled before any ``exp``, so no NaN reaches
    the gradients).
    """
    b, kh, rows, _ = q_i.shape
    bq, bk = cfg.block_q, cfg.block_k
    g = rows // bq
    s = jnp.einsum("bkrh,bksh->bkrs", q_i, k_j, precision=cfg.precision,
                   preferred_element_type=jnp.float32) * jnp.float32(cfg.scale)
    s = s.reshape(b, kh, bq, g, bk)
    if bias is not None:
        s = s + _block(bias, i, j, cfg).astype(jnp.float32)
    keep = _block(mask, i, j, cfg)
    # Structural mask from positions: causal/window band and padded keys.
    q_pos = i * bq + jnp.arange(bq) + cfg.offset
    k_pos = j * bk + jnp.arange(bk)
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
    if keep is not None:
        s = jnp.where(keep, s, -jnp.inf)
    return s.reshape(b, kh, bq * g, bk)


def _rows(x, i, block_q):
    """Query block ``i`` of ``[B, K, T, G, ...]`` as ``[B, K, block_q·G, ...]``."""
    starts = (0, 0, i * block_q) + (0,) * (x.ndim - 3)
    blk = lax.dynamic_slice(x, starts, x.shape[:2] + (block_q,) + x.shape[3:])
    return blk.reshape(x.shape[:2] + (block_q * x.shape[3],) + x.shape[4:])


def _cols(x, j, block_k):
    """Key block ``j`` of ``[B, K, S, X]``."""
    return lax.dynamic_slice(x, (0, 0, j * block_k, 0), x.shape[:2] + (block_k,) + x.shape[3:])


def _put_rows(x, blk, i, block_q):
    """Writes ``[B, K, block_q·G, ...]`` back into query block ``i`` of ``x``."""
    blk = blk.reshape(x.shape[:2] + (block_q,) + x.shape[3:])
    return lax.dynamic_update_slice(x, blk.astype(x.dtype), (0, 0, i * block_q) + (0,) * (x.ndim - 3))


def _forward(q, k, v, mask, bias, cfg: _Config):
    """Online-softmax forward. ``q [B,K,Tp,G,H]``, ``k [B,K,Sp,H]``, ``v [B,K,Sp,D]``.

    Returns ``out [B,K,Tp,G,D]`` (input dtype) and float32 ``lse [B,K,Tp,G]``
    with ``+inf`` on rows that see no key (so ``exp(s - lse) = 0`` there).
    """
    b, kh, tp, g, _ = q.shape
    d = v.shape[-1]
    kv_lo, kv_hi, _, _ = (jnp.asarray(a) for a in cfg.plan)
    rows = cfg.block_q * g

    def q_block(i, carry):
        out, lse = carry
        q_i = _rows(q, i, cfg.block_q)

        def kv_step(j, state):
            m, l, acc = state
            s = _scores(q_i, _cols(k, j, cfg.block_k), mask, bias, i, j, cfg)
            m_new = jnp.maximum(m, s.max(-1))
            # A row with no visible key so far has m = -inf; shift by 0 instead
            # so exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN.
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)  # rescales the old statistics (Alg. 1, line 10)
            pv = jnp.einsum("bkrs,bksd->bkrd", p.astype(v.dtype), _cols(v, j, cfg.block_k),
                            precision=cfg.precision, preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        init = (jnp.full((b, kh, rows), -jnp.inf, jnp.float32),
                jnp.zeros((b, kh, rows), jnp.float32),
                jnp.zeros((b, kh, rows, d), jnp.float32))
        m, l, acc = lax.fori_loop(kv_lo[i], kv_hi[i], kv_step, init)
        seen = l > 0
        o_i = acc / jnp.where(seen, l, 1.0)[..., None]  # acc is 0 where nothing was seen
        lse_i = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return _put_rows(out, o_i, i, cfg.block_q), _put_rows(lse, lse_i, i, cfg.block_q)

    init = (jnp.zeros((b, kh, tp, g, d), q.dtype), jnp.zeros((b, kh, tp, g), jnp.float32))
    return lax.fori_loop(0, tp // cfg.block_q, q_block, init)


def _backward(q, k, v, mask, bias, out, lse, do, cfg: _Config):
    """Recomputing backward: key blocks outer (dK, dV in registers), query blocks inner."""
    b, kh, tp, g, h = q.shape
    sp, d = v.shape[-2], v.shape[-1]
    _, _, q_lo, q_hi = (jnp.asarray(a) for a in cfg.plan)
    # rowsum(dO ∘ O) (FlashAttention-2's D_i): the softmax Jacobian's diagonal term.
    delta = jnp.einsum("bktgd,bktgd->bktg", do.astype(jnp.float32), out.astype(jnp.float32))
    f32 = jnp.float32

    def kv_block(j, carry):
        dq, dk, dv, dbias = carry
        k_j, v_j = _cols(k, j, cfg.block_k), _cols(v, j, cfg.block_k)

        def q_step(i, state):
            dk_j, dv_j, dq, dbias = state
            q_i, do_i = _rows(q, i, cfg.block_q), _rows(do, i, cfg.block_q)
            s = _scores(q_i, k_j, mask, bias, i, j, cfg)
            p = jnp.exp(s - _rows(lse, i, cfg.block_q)[..., None])
            dv_j = dv_j + jnp.einsum("bkrs,bkrd->bksd", p.astype(do.dtype), do_i,
                                     precision=cfg.precision, preferred_element_type=f32)
            dp = jnp.einsum("bkrd,bksd->bkrs", do_i, v_j,
                            precision=cfg.precision, preferred_element_type=f32)
            ds = p * (dp - _rows(delta, i, cfg.block_q)[..., None])
            ds_c = ds.astype(q.dtype)
            dq_i = jnp.einsum("bkrs,bksh->bkrh", ds_c, k_j,
                              precision=cfg.precision, preferred_element_type=f32)
            dq = _put_rows(dq, _rows(dq, i, cfg.block_q) + dq_i, i, cfg.block_q)
            dk_j = dk_j + jnp.einsum("bkrs,bkrh->bksh", ds_c, q_i,
                                     precision=cfg.precision, preferred_element_type=f32)
            if dbias is not None:
                dbias = _add_bias_block(dbias, ds, i, j, cfg)
            return dk_j, dv_j, dq, dbias

        init = (jnp.zeros((b, kh, cfg.block_k, h), f32), jnp.zeros((b, kh, cfg.block_k, d), f32),
                dq, dbias)
        dk_j, dv_j, dq, dbias = lax.fori_loop(q_lo[j], q_hi[j], q_step, init)
        start = (0, 0, j * cfg.block_k, 0)
        return (dq, lax.dynamic_update_slice(dk, dk_j, start),
                lax.dynamic_update_slice(dv, dv_j, start), dbias)

    init = (jnp.zeros((b, kh, tp, g, h), f32), jnp.zeros((b, kh, sp, h), f32),
            jnp.zeros((b, kh, sp, d), f32),
            None if bias is None else jnp.zeros(bias.shape, f32))
    dq, dk, dv, dbias = lax.fori_loop(0, sp // cfg.block_k, kv_block, init)
    scale = jnp.float32(cfg.scale)  # d(logits)/dQ = scale·K: applied once, after the sums
    return ((dq * scale).astype(q.dtype), (dk * scale).astype(k.dtype), dv.astype(v.dtype),
            None if bias is None else dbias.astype(bias.dtype))


def _add_bias_block(dbias, ds, i, j, cfg: _Config):
    """Accumulates ``dS`` of block ``(i, j)`` into ``dbias``, summing broadcast axes."""
    b, kh, rows, bk = ds.shape
    ds = ds.reshape(b, kh, cfg.block_q, rows // cfg.block_q, bk)
    axes = tuple(a for a in range(5) if dbias.shape[a] == 1 and ds.shape[a] > 1)
    ds = ds.sum(axes, keepdims=True) if axes else ds
    starts = (0, 0, i * cfg.block_q if dbias.shape[2] > 1 else 0, 0,
              j * cfg.block_k if dbias.shape[4] > 1 else 0)
    old = lax.dynamic_slice(dbias, starts, ds.shape)
    return lax.dynamic_update_slice(dbias, old + ds, starts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, mask, bias, cfg):
    return _forward(q, k, v, mask, bias, cfg)[0]


def _flash_fwd(q, k, v, mask, bias, cfg):
    out, lse = _forward(q, k, v, mask, bias, cfg)
    return out, (q, k, v, mask, bias, out, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, mask, bias, out, lse = res
    dq, dk, dv, dbias = _backward(q, k, v, mask, bias, out, lse, do, cfg)
    return dq, dk, dv, None, dbias


_flash.defvjp(_flash_fwd, _flash_bwd)
# Jitted on its static config, so eager callers compile the loops once per shape
# rather than on every call; under an outer jit this simply inlines.
_flash_jit = jax.jit(_flash, static_argnums=(5,))


# ----------------------------------------------------------------------------- public API


def _block_size(requested: Optional[int], length: int, name: str) -> int:
    """Explicit size (clipped to the length), or the default split into equal blocks."""
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"{name} must be a positive int, got {requested}.")
        return min(int(requested), length)
    n_blocks = -(-length // default_block_size())
    size = -(-length // n_blocks)
    # Several blocks: round to a multiple of 8 (vector width) so padding stays < 8·n_blocks.
    return size if n_blocks == 1 else -(-size // 8) * 8


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
    ``value`` and ``bias`` via a recomputing ``custom_vjp``.

    Args:
      query: ``[..., T, N, H]``.
      key: ``[..., S, K, H]`` with ``N % K == 0`` (K/V are never repeated).
      value: ``[..., S, K, D]``; ``None`` means key = value.
      mask: boolean, broadcastable to ``[..., N, T, S]``; ``True`` = attend.
        Sliced per block; keep broadcast axes as size 1 to save memory.
      bias: float, broadcastable to ``[..., N, T, S]``; sliced per block.
      scale: static logit scale; defaults to ``1 / sqrt(H)``.
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
      ``[..., T, N, D]`` in the query's dtype. Rows that see no key are zeros.

    Raises:
      ValueError: on bad shapes, a non-boolean mask, a negative window or
        block size, or an unknown alignment.
    """
    value = key if value is None else value
    _check_inputs(query, key, value, mask, bias)
    *batch, t, n, h = query.shape
    s, kh, d = value.shape[-3:]
    g = n // kh
    bsz = math.prod(batch)
    bq = _block_size(block_q, t, "block_q")
    bk = _block_size(block_k, s, "block_k")
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    offset, left, right = _band(t, s, is_causal, causal_alignment, window)
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)

    q = query.reshape(bsz, t, kh, g, h).transpose(0, 2, 1, 3, 4)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, tp - t), (0, 0), (0, 0)))
    k = jnp.pad(key.reshape(bsz, s, kh, h).transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    v = jnp.pad(value.reshape(bsz, s, kh, d).transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    mask = _normalize(mask, batch, kh, g, t, s, tp, sp, False)
    bias = _normalize(bias, batch, kh, g, t, s, tp, sp, 0)
    cfg = _Config(t, s, bq, bk, offset, left, right, scale, precision)
    out = _flash_jit(q, k, v, mask, bias, cfg)  # [B, K, Tp, G, D]
    return out[:, :, :t].transpose(0, 2, 1, 3, 4).reshape(*batch, t, n, d)


def computed_blocks(t: int, s: int, *, is_causal: bool = False, causal_alignment: str = "bottom_right",
                    window: Optional[Window] = None, block_q: Optional[int] = None,
                    block_k: Optional[int] = None) -> Tuple[int, int]:
    """``(computed, total)`` block counts that :func:`chunked_attention` uses for these lengths."""
    bq = _block_size(block_q, t, "block_q")
    bk = _block_size(block_k, s, "block_k")
    offset, left, right = _band(t, s, is_causal, causal_alignment, window)
    kv_lo, kv_hi, _, _ = block_plan(t, s, bq, bk, offset=offset, left=left, right=right)
    return int((kv_hi - kv_lo).sum()), (-(-t // bq)) * (-(-s // bk))
