"""Ring attention: exact attention over a sequence sharded across devices.

Called inside :func:`jax.shard_map` with the sequence axis split over a mesh
axis of ``P`` devices. Each device keeps its queries; key/value blocks (and
their key-padding mask) travel around the ring with :func:`jax.lax.ppermute`,
one hop per step, so after ``P`` steps every query has met every key (Liu et
al. 2023, "Ring Attention with Blockwise Transformers", Sec. 3). Each step runs
the chunked kernel's online-softmax forward
(:mod:`flax_attention.kernels._flash_passes`) on the local queries against the
visiting block and merges the partial result by log-sum-exp:
``L = logaddexp(L₁, L₂)``, ``O = O₁·e^(L₁−L) + O₂·e^(L₂−L)`` (the same
rescaling as FlashAttention's Alg. 1, line 10, one level up). The next block's
``ppermute`` is issued before the step's compute, so XLA can overlap the
transfer with it.

The backward (``custom_vjp``) runs the ring again: each device recomputes its
queries' probabilities against the visiting block from the saved global
log-sum-exp, adds into ``dQ`` locally, and adds ``dK``/``dV`` into
accumulators that travel with the block and arrive home after ``P`` hops.
Per-device memory is ``O(T/P)``: no ``T × S`` array and no all-gathered K/V.

Layouts (which global positions a shard holds) — see
:mod:`flax_attention.functional.context_parallel` for the permutation helpers:

* ``"contiguous"``: shard ``i`` holds chunk ``i`` of ``P`` equal chunks. Under
  a causal mask shard ``i`` computes ``i + 1`` block pairs (``i`` full, one
  diagonal) and skips the rest: shard ``P − 1`` does ``P`` times the work of
  shard 0.
* ``"zigzag"``: the sequence is cut into ``2P`` chunks and shard ``i`` holds
  chunks ``i`` and ``2P − 1 − i`` (Brandon et al. 2023 discuss this family of
  load-balanced layouts). Every step then costs every shard the same: half a
  block pair after the first step.

Chunk pairs entirely in the future are skipped (``lax.switch``; under
``vmap`` a switch becomes a select and computes every branch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from flax_attention.kernels._blocks import block_sizes
from flax_attention.kernels._flash_passes import _backward, _forward, dq_from_transposed
from flax_attention.kernels._flash_tiles import _Config
from flax_attention.core.checks import prepare
from flax_attention.core.dtypes import compute_dtype, mask_fill
from flax_attention.core.tracing import vary_like

Array = jnp.ndarray

LAYOUTS = ("contiguous", "zigzag")
_SKIP, _FULL, _DIAG = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static description of one ring call (a ``custom_vjp`` nondiff argument)."""

    axis_name: object
    size: int  # P, devices on the ring
    layout: str
    causal: bool
    chunk_q: int  # C: rows per local chunk (T_local / chunks)
    chunk_k: int
    block_q: int
    block_k: int
    precision: lax.PrecisionLike = None

    @property
    def chunks(self) -> int:
        return 2 if self.layout == "zigzag" else 1


def chunk_ids(shard, size: int, layout: str) -> Tuple:
    """Global chunk indices held by ``shard`` (an int or a traced index), in local order."""
    if layout == "zigzag":
        return (shard, 2 * size - 1 - shard)
    return (shard,)


def _pair_kind(q_chunk, k_chunk, causal: bool):
    """Which of skip / full / diagonal a (query chunk, key chunk) pair is."""
    if not causal:
        return _FULL
    return jnp.where(k_chunk < q_chunk, _FULL, jnp.where(k_chunk == q_chunk, _DIAG, _SKIP))


def _pad(x, axis: int, to: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, to - x.shape[axis])
    return x if to == x.shape[axis] else jnp.pad(x, pad, constant_values=value)


def _kernel_config(rc: _Ring, diag: bool) -> _Config:
    # Diagonal pairs share positions (equal chunk lengths), so causal is a band
    # with offset 0 and right = 0; full pairs have no band at all.
    return _Config(rc.chunk_q, rc.chunk_k, rc.block_q, rc.block_k, 0, None, 0 if diag else None,
                   rc.precision)


def _padded(rc: _Ring, q, k, v, km):
    """Pads one chunk pair to whole blocks; padded keys are masked structurally."""
    tp = -(-rc.chunk_q // rc.block_q) * rc.block_q
    sp = -(-rc.chunk_k // rc.block_k) * rc.block_k
    mask = None if km is None else _pad(km[:, None, None, None, :], 4, sp, False)
    return _pad(q, 2, tp), _pad(k, 2, sp), _pad(v, 2, sp), mask


def _pair_forward(rc: _Ring, kind, q, k, v, km, scale):
    """Partial ``(out [B,K,C,G,D], lse [B,K,C,G])`` of a chunk pair, in the compute dtype."""
    b, kh, c, g, _ = q.shape
    d, cdt = v.shape[-1], scale.dtype

    def run(diag):
        def f(q, k, v, km):
            qp, kp, vp, mask = _padded(rc, q, k, v, km)
            out, lse = _forward(qp, kp, vp, mask, None, None, scale, _kernel_config(rc, diag), out_dtype=cdt)
            return out[:, :, :c], lse[:, :, :c]
        return f

    def skip(q, k, v, km):
        return vary_like((jnp.zeros((b, kh, c, g, d), cdt), jnp.full((b, kh, c, g), mask_fill(cdt), cdt)), q, k, v)

    if not rc.causal:
        return run(False)(q, k, v, km)
    return lax.switch(kind, (skip, run(False), run(True)), q, k, v, km)


def _pair_backward(rc: _Ring, kind, q, k, v, km, scale, out, lse, do, acc):
    """Adds a chunk pair's gradients into ``acc = (dq_t, dk, dv)`` (padded, unscaled; see ``_backward``)."""
    def run(diag):
        def f(q, k, v, km, out, lse, do, acc):
            qp, kp, vp, mask = _padded(rc, q, k, v, km)
            tp = qp.shape[2]
            return _backward(qp, kp, vp, mask, None, None, scale, _pad(out, 2, tp), _pad(lse, 2, tp),
                             _pad(do, 2, tp), _kernel_config(rc, diag), acc=acc)
        return f

    def skip(q, k, v, km, out, lse, do, acc):
        return acc

    if not rc.causal:
        return run(False)(q, k, v, km, out, lse, do, acc)
    return lax.switch(kind, (skip, run(False), run(True)), q, k, v, km, out, lse, do, acc)


def _chunk(x, a: int, size: int, axis: int = 2):
    return None if x is None else lax.slice_in_dim(x, a * size, (a + 1) * size, axis=axis)


def _merge(acc, part):
    """Log-sum-exp merge of two partial softmax results (finite for unseen rows)."""
    (o1, l1), (o2, l2) = acc, part
    mx = jnp.maximum(l1, l2)
    w1, w2 = jnp.exp(l1 - mx), jnp.exp(l2 - mx)
    tot = w1 + w2  # >= 1: the larger term is exp(0)
    lse = mx + jnp.log(tot)
    return o1 * (w1 / tot)[..., None] + o2 * (w2 / tot)[..., None], lse


def _shift(rc: _Ring, tree):
    """Sends ``tree`` one hop along the ring: shard ``i`` -> ``i + 1``."""
    perm = [(j, (j + 1) % rc.size) for j in range(rc.size)]
    return jax.tree.map(lambda x: lax.ppermute(x, rc.axis_name, perm), tree)


def _ring_forward(q, k, v, km, scale, rc: _Ring):
    me = lax.axis_index(rc.axis_name)
    cq, ck, m = rc.chunk_q, rc.chunk_k, rc.chunks
    q_ids = chunk_ids(me, rc.size, rc.layout)
    b, kh, t, g, _ = q.shape
    cdt = scale.dtype
    init_acc = vary_like(tuple((jnp.zeros((b, kh, cq, g, v.shape[-1]), cdt),
                                jnp.full((b, kh, cq, g), mask_fill(cdt), cdt)) for _ in range(m)), q, k, v)

    def step(s, carry):
        (k_s, v_s, km_s), acc = carry
        # Issued first: the next block's transfer does not depend on this step's compute.
        nxt = _shift(rc, (k_s, v_s, km_s))
        k_ids = chunk_ids((me - s) % rc.size, rc.size, rc.layout)
        acc = list(acc)
        for a in range(m):
            for bb in range(m):
                part = _pair_forward(rc, _pair_kind(q_ids[a], k_ids[bb], rc.causal), _chunk(q, a, cq),
                                     _chunk(k_s, bb, ck), _chunk(v_s, bb, ck), _chunk(km_s, bb, ck, 1), scale)
                acc[a] = _merge(acc[a], part)
        return nxt, tuple(acc)

    _, acc = lax.fori_loop(0, rc.size, step, ((k, v, km), init_acc))
    out = jnp.concatenate([o for o, _ in acc], axis=2)
    lse = jnp.concatenate([lse for _, lse in acc], axis=2)
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, km, scale, rc):
    return _ring_forward(q, k, v, km, scale, rc)[0]


def _ring_fwd(q, k, v, km, scale, rc):
    out, lse = _ring_forward(q, k, v, km, scale, rc)
    return out, (q, k, v, km, scale, out, lse)


def _ring_bwd(rc, res, do):
    q, k, v, km, scale, out, lse = res
    me = lax.axis_index(rc.axis_name)
    cq, ck, m = rc.chunk_q, rc.chunk_k, rc.chunks
    q_ids = chunk_ids(me, rc.size, rc.layout)
    cdt = scale.dtype
    b, kh, _, g, h = q.shape
    d = v.shape[-1]
    tp = -(-cq // rc.block_q) * rc.block_q  # padded chunk lengths: the accumulators' shapes
    sp = -(-ck // rc.block_k) * rc.block_k

    def step(s, carry):
        (k_s, v_s, km_s), (dk_s, dv_s), dq_t = carry
        nxt = _shift(rc, (k_s, v_s, km_s))
        k_ids = chunk_ids((me - s) % rc.size, rc.size, rc.layout)
        dq_t, dk_s, dv_s = list(dq_t), list(dk_s), list(dv_s)
        for a in range(m):
            for bb in range(m):
                dq_t[a], dk_s[bb], dv_s[bb] = _pair_backward(
                    rc, _pair_kind(q_ids[a], k_ids[bb], rc.causal), _chunk(q, a, cq), _chunk(k_s, bb, ck),
                    _chunk(v_s, bb, ck), _chunk(km_s, bb, ck, 1), scale, _chunk(out, a, cq),
                    _chunk(lse, a, cq), _chunk(do, a, cq), (dq_t[a], dk_s[bb], dv_s[bb]))
        # The dK/dV sums travel with their block; after the last step's hop
        # every block's sums are back on the shard that owns it.
        dkv = _shift(rc, (tuple(dk_s), tuple(dv_s)))
        return nxt, dkv, tuple(dq_t)

    zeros = vary_like((tuple(jnp.zeros((b, kh, sp, h), cdt) for _ in range(m)),
                       tuple(jnp.zeros((b, kh, sp, d), cdt) for _ in range(m)),
                       tuple(jnp.zeros((b, kh, h, tp * g), cdt) for _ in range(m))), q, k, v, do)
    _, (dk, dv), dq_t = lax.fori_loop(0, rc.size, step, ((k, v, km), zeros[:2], zeros[2]))
    # d(logits)/dQ = scale·K and d(logits)/dK = scale·Q: applied once, after the sums.
    dq = jnp.concatenate([dq_from_transposed(x, g)[:, :, :cq] for x in dq_t], axis=2) * scale
    dk = jnp.concatenate([x[:, :, :ck] for x in dk], axis=2) * scale
    dv = jnp.concatenate([x[:, :, :ck] for x in dv], axis=2)
    dkm = None if km is None else jnp.zeros(km.shape, jax.dtypes.float0)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dkm, jnp.zeros_like(scale)


_ring.defvjp(_ring_fwd, _ring_bwd)


def _axis_size(axis_name) -> int:
    try:
        return lax.axis_size(axis_name)
    except (NameError, KeyError, ValueError) as err:
        raise ValueError(
            f"ring_attention: axis_name={axis_name!r} is not a bound mesh axis here. Call it inside "
            "jax.shard_map over a mesh that has this axis (with the sequence axis split over it), or use "
            "context_parallel_attention(..., mesh=mesh, axis=...) with global arrays.") from err


def ring_attention(
    query: Array,
    key: Array,
    value: Optional[Array] = None,
    *,
    axis_name,
    is_causal: bool = False,
    key_mask: Optional[Array] = None,
    scale: Optional[float] = None,
    layout: str = "contiguous",
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
    precision=None,
) -> Array:
    """Per-shard exact attention with the sequence split over mesh axis ``axis_name``.

    Call inside :func:`jax.shard_map`; every argument is this shard's piece.
    The result equals the matching rows of
    :func:`~flax_attention.functional.attention.scaled_dot_product_attention` on the whole
    sequence (float32 rounding), with the same guarantees: GQA (``N % K == 0``),
    ``D != H``, rows that see no key give zeros with finite gradients, softmax
    statistics in at least float32. Differentiable in ``query``, ``key`` and
    ``value`` (reverse mode; the backward runs the ring too).

    Args:
      query: ``[B, T/P, N, H]``: this shard's queries.
      key: ``[B, S/P, K, H]``: this shard's keys (same layout as the queries).
      value: ``[B, S/P, K, D]``; ``None`` means key = value.
      axis_name: the mesh axis the sequence is split over (``P`` shards).
      is_causal: causal mask over global positions (needs ``T == S``); chunk
        pairs entirely in the future are skipped.
      key_mask: boolean ``[B, S/P]``, ``True`` = a real key (key padding or any
        per-key mask, sharded like the keys); travels with them.
      scale: a Python float; defaults to ``1 / sqrt(H)``.
      layout: ``"contiguous"`` (shard ``i`` holds chunk ``i``) or ``"zigzag"``
        (shard ``i`` holds chunks ``i`` and ``2P-1-i`` of ``2P``; see
        :func:`flax_attention.functional.context_parallel.to_layout`). The queries and
        keys must already be in that layout.
      block_q, block_k: the chunked kernel's block sizes within a step.
      precision: passed to every block matmul.

    Returns:
      ``[B, T/P, N, D]`` in the query's dtype: this shard's output rows.

    Raises:
      ValueError: on an unbound ``axis_name``, an unknown layout, a causal call
        with ``T != S``, local lengths not divisible by the layout's chunks per
        shard, a traced ``scale``, bad shapes/dtypes, or a ``key_mask`` of the
        wrong shape or dtype.
    """
    query, key, value, _, _, _ = prepare(query, key, value, None, None)
    size = _axis_size(axis_name)
    if layout not in LAYOUTS:
        raise ValueError(f"ring_attention: layout must be one of {LAYOUTS}, got {layout!r}.")
    if query.ndim != 4:
        raise ValueError(f"ring_attention: query must be [B, T, N, H], got shape {query.shape}.")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError("ring_attention: scale must be a Python number (or None for 1/sqrt(H)); "
                         "a traced scale is not supported by the ring's custom_vjp.")
    b, t, n, h = query.shape
    s, kh, d = value.shape[-3:]
    m = 2 if layout == "zigzag" else 1
    if is_causal and t != s:
        raise ValueError(f"ring_attention: is_causal needs queries and keys of one sequence (local T == S), "
                         f"got T={t}, S={s}; for cross-attention use is_causal=False.")
    for name, length in (("query", t), ("key", s)):
        if length % m or length == 0:
            raise ValueError(f"ring_attention: the local {name} length {length} must be a positive multiple of "
                             f"{m} for layout={layout!r}; pad the global sequence to a multiple of "
                             f"{m * size} (axis size x {m}) and mark the padding with key_mask.")
    if key_mask is not None:
        key_mask = jnp.asarray(key_mask)
        if key_mask.dtype != jnp.bool_ or key_mask.shape != (b, s):
            raise ValueError(f"ring_attention: key_mask must be boolean [B, S_local] = {(b, s)}, "
                             f"got {key_mask.dtype} {key_mask.shape}.")
    g = n // kh
    cdt = compute_dtype(query.dtype)
    scale_arr = jnp.asarray(1.0 / math.sqrt(h) if scale is None else scale, cdt)
    cq, ck = t // m, s // m
    bq, bk = block_sizes(block_q, block_k, cq, ck, b * n, bool(is_causal))
    rc = _Ring(axis_name, size, layout, bool(is_causal), cq, ck, bq, bk, precision)
    q = query.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4)  # [B, K, T, G, H]
    k = key.transpose(0, 2, 1, 3)
    v = value.transpose(0, 2, 1, 3)
    out = _ring(q, k, v, key_mask, scale_arr, rc)  # [B, K, T, G, D]
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, n, d)
