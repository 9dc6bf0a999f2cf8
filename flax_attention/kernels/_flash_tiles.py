"""Block tiles of :func:`flax_attention.kernels.flash.chunked_attention`: the static
per-call config, block slicing of operands/masks/biases, and one block's
scaled, masked logits (in the forward's ``Q Kᵀ`` or the backward's ``K Qᵀ``
layout). Shared by the forward and backward passes in
:mod:`flax_attention.kernels._flash_passes`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
from jax import lax

from flax_attention.kernels._blocks import block_plan, full_block_plan
from flax_attention.core.dtypes import mask_fill

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
    precision: lax.PrecisionLike = None

    def segments(self, transposed: bool = False):
        """The inner loop's ranges: ``[(lo, hi, structural), ...]`` per outer block.

        Each outer block's computed range is split into the blocks that need
        the band/padding mask (``structural=True``) and the full ones between
        them (:func:`full_block_plan`), so most blocks of a causal or windowed
        call run without position arithmetic or selects. Segments that are
        empty for every outer block are left out (decided statically), so a
        call without any band compiles one loop. ``transposed``: per key block
        over query blocks (the backward's order), else per query block.
        """
        args = (self.t, self.s, self.block_q, self.block_k)
        plan = block_plan(*args, offset=self.offset, left=self.left, right=self.right)
        full = full_block_plan(*args, offset=self.offset, left=self.left, right=self.right)
        lo, hi = plan[2:] if transposed else plan[:2]
        f_lo, f_hi = full[2:] if transposed else full[:2]
        out = [(a, b, flag) for a, b, flag in ((lo, f_lo, True), (f_lo, f_hi, False), (f_hi, hi, True))
               if (b > a).any()]
        # int32 bounds: under 64-bit mode a Python-int loop bound would make an
        # int64 block index, and dynamic slices reject mixed index types.
        return [(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32), flag) for a, b, flag in out]


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


def _scores(q_i, k_j, mask, bias, bias_keep, scale, i, j, cfg: _Config, transposed: bool = False,
            structural: bool = True, prescaled: bool = False):
    """Scaled, biased, masked logits of block ``(i, j)`` and their ``keep``.

    Returns ``[B, K, bq·G, bk]``, or with ``transposed`` ``[B, K, bk, bq·G]``
    (``K Qᵀ``: the backward's layout, see :func:`_backward`). Logits are in
    ``scale.dtype`` (the compute dtype). Masked entries hold the finite
    :func:`mask_fill` (no infinity is created, so ``jax.debug_infs`` stays
    quiet); ``keep`` (boolean, same shape, or ``None`` if every entry is kept)
    tells callers which probabilities to zero. ``structural=False`` (a full
    block, see :meth:`_Config.segments`) skips the band and padding mask;
    ``prescaled``: ``q_i`` already carries the scale (:func:`prescale`).
    """
    b, kh, rows, _ = q_i.shape
    bq, bk = cfg.block_q, cfg.block_k
    g = rows // bq
    if transposed:
        s = jnp.einsum("bksh,bkrh->bksr", k_j, q_i, precision=cfg.precision,
                       preferred_element_type=scale.dtype).reshape(b, kh, bk, bq, g)

        def tile(x):  # key axis (last) in front of the query axes: [..., bq, Gx, bk] -> [..., bk, bq, Gx]
            return None if x is None else jnp.moveaxis(x, -1, -3)
    else:
        s = jnp.einsum("bkrh,bksh->bkrs", q_i, k_j, precision=cfg.precision,
                       preferred_element_type=scale.dtype).reshape(b, kh, bq, g, bk)

        def tile(x):
            return x
    if not prescaled:
        s = s * scale
    keep = tile(_block(mask, i, j, cfg))
    if bias is not None:  # finite: `prepare` moved -inf entries to bias_keep
        s = s + tile(_block(bias, i, j, cfg)).astype(s.dtype)
        bias_ok = tile(_block(bias_keep, i, j, cfg))
        keep = bias_ok if keep is None else keep & bias_ok
    conds = []
    if structural:  # the band (causal/window) and padded keys, from positions
        q_pos = i * bq + jnp.arange(bq, dtype=jnp.int32) + cfg.offset
        k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)
        diff = q_pos[:, None, None] - k_pos[None, None, :]  # [bq, 1, bk]
        if cfg.left is not None:
            conds.append(diff <= cfg.left)
        if cfg.right is not None:
            conds.append(diff >= -cfg.right)
        if cfg.s % bk:
            conds.append(k_pos[None, None, :] < cfg.s)
    for c in conds:
        c = tile(c)
        keep = c if keep is None else keep & c
    shape = (b, kh, bk, rows) if transposed else (b, kh, rows, bk)
    if keep is None:
        return s.reshape(shape), None
    keep = jnp.broadcast_to(keep, s.shape)
    s = jnp.where(keep, s, mask_fill(s.dtype))
    return s.reshape(shape), keep.reshape(shape)


def prescale(q_i, scale):
    """``(q_i · scale, True)`` when that is as exact as scaling the logits, else ``(q_i, False)``.

    The flag is :func:`_scores`'s ``prescaled``.

    Scaling a query block once (``bq·H`` products) instead of every logit tile
    (``bq·bk``) saves a full read and write of the tile per key block on CPU,
    where XLA materialises the scaled tile for both the row max and the exp.
    Only for inputs already in the compute dtype (float32/float64): in
    bfloat16/float16 the product would be rounded to the input precision.
    """
    if q_i.dtype != scale.dtype:
        return q_i, False
    return q_i * scale, True


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
