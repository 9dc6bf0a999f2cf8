"""The forward and backward block loops of :func:`flax_attention.kernels.flash.chunked_attention`.

Forward: online softmax over key blocks (FlashAttention, Dao et al. 2022, Alg. 1).
Backward: recomputes each block's probabilities from the saved log-sum-exp and
applies Alg. 2 of the same paper. Operands arrive padded and head-grouped:
``q [B, K, Tp, G, H]``, ``k [B, K, Sp, H]``, ``v [B, K, Sp, D]``.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from flax_attention.kernels._flash_tiles import (
    _Config, _add_bias_block, _cols, _idx, _put_rows, _rows, _scores, prescale)
from flax_attention.core.dtypes import mask_fill
from flax_attention.core.tracing import vary_like


def _forward(q, k, v, mask, bias, bias_keep, scale, cfg: _Config, out_dtype=None):
    """Online-softmax forward. ``q [B,K,Tp,G,H]``, ``k [B,K,Sp,H]``, ``v [B,K,Sp,D]``.

    Returns ``out [B,K,Tp,G,D]`` (``out_dtype``, default the input dtype) and
    ``lse [B,K,Tp,G]`` in the compute dtype (``scale.dtype``). On rows that see
    no key ``lse`` is the finite :func:`mask_fill` (log 0, without an infinity):
    a ring step's partial results then merge by log-sum-exp with weight 0, and
    the backward zeroes those rows' probabilities through ``keep`` anyway.
    """
    b, kh, tp, g, _ = q.shape
    d = v.shape[-1]
    cdt = scale.dtype
    segments = cfg.segments()
    rows = cfg.block_q * g

    def q_block(i, carry):
        out, lse = carry
        q_i, prescaled = prescale(_rows(q, i, cfg.block_q), scale)

        def kv_step(j, state, structural):
            m, l, acc = state
            s, keep = _scores(q_i, _cols(k, j, cfg.block_k), mask, bias, bias_keep, scale, i, j, cfg,
                              structural=structural, prescaled=prescaled)
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

        init = vary_like((jnp.full((b, kh, rows), mask_fill(cdt), cdt),
                          jnp.zeros((b, kh, rows), cdt),
                          jnp.zeros((b, kh, rows, d), cdt)), q, k, v, mask, bias, scale)
        for lo, hi, structural in segments:  # masked, full, masked key blocks (static split)
            init = lax.fori_loop(lo[i], hi[i], functools.partial(kv_step, structural=structural), init)
        m, l, acc = init
        seen = l > 0
        safe_l = jnp.where(seen, l, 1)
        o_i = acc / safe_l[..., None]  # acc is 0 where nothing was seen
        lse_i = jnp.where(seen, m + jnp.log(safe_l), mask_fill(cdt))
        return _put_rows(out, o_i, i, cfg.block_q), _put_rows(lse, lse_i, i, cfg.block_q)

    init = vary_like((jnp.zeros((b, kh, tp, g, d), out_dtype or q.dtype), jnp.zeros((b, kh, tp, g), cdt)),
                     q, k, v, mask, bias, scale)
    return lax.fori_loop(jnp.int32(0), jnp.int32(tp // cfg.block_q), q_block, init)


def _backward(q, k, v, mask, bias, bias_keep, scale, out, lse, do, cfg: _Config, acc=None):
    """Recomputing backward: key blocks outer (dK, dV accumulate in the carry), query blocks inner.

    Returns ``(dq, dk, dv, dbias, dscale)`` in the operands' dtypes. With
    ``acc = (dq_t, dk, dv)`` (compute dtype, unscaled, ``dq_t`` transposed as
    ``[B, K, H, Tp·G]``) the pass adds into those accumulators and returns them
    raw instead: ring attention sums its steps that way without a partial
    gradient per step (finish with :func:`dq_from_transposed` and the scale).

    Works on transposed tiles ``Sᵀ = K Qᵀ`` (``[B, K, bk, bq·G]``) and
    accumulates ``dQᵀ`` against a transposed copy of ``K``, so that every block
    matmul contracts the minor axis of its left operand (``A Bᵀ`` or ``A B``).
    XLA:CPU hands those to its fast matmul library; a ``Pᵀ dO``/``dSᵀ Q`` on
    untransposed tiles contracts the left operand's major axis and falls back to
    a generic dot: measured 1.3-1.5x slower for the whole backward on 2 cores
    (benchmarks/results/cpu_levers.md).
    """
    b, kh, tp, g, h = q.shape
    sp, d = v.shape[-2], v.shape[-1]
    cdt = scale.dtype
    bq, bk = cfg.block_q, cfg.block_k
    rows = bq * g
    segments = cfg.segments(transposed=True)
    # rowsum(dO ∘ O) (FlashAttention-2's D_i): the softmax Jacobian's diagonal term.
    delta = jnp.einsum("bktgd,bktgd->bktg", do.astype(cdt), out.astype(cdt))
    k_t = jnp.swapaxes(k, -1, -2)  # [B, K, H, Sp]: the left operand of dQᵀ += Kᵀ dSᵀ

    def kv_block(j, carry):
        dq_t, dk, dv, dbias = carry
        k_j, v_j = _cols(k, j, bk), _cols(v, j, bk)
        k_t_j = lax.dynamic_slice(k_t, _idx((0, 0, 0, j * bk)), (b, kh, h, bk))

        def q_step(i, state, structural):
            dk_j, dv_j, dq_t, dbias = state
            q_i, do_i = _rows(q, i, bq), _rows(do, i, bq)
            s_t, keep = _scores(q_i, k_j, mask, bias, bias_keep, scale, i, j, cfg, transposed=True,
                                structural=structural)
            p_t = jnp.exp(s_t - _rows(lse, i, bq)[..., None, :])
            if keep is not None:
                p_t = jnp.where(keep, p_t, 0)
            dv_j = dv_j + jnp.einsum("bksr,bkrd->bksd", p_t.astype(do.dtype), do_i,
                                     precision=cfg.precision, preferred_element_type=cdt)
            dp_t = jnp.einsum("bksd,bkrd->bksr", v_j, do_i,
                              precision=cfg.precision, preferred_element_type=cdt)
            ds_t = p_t * (dp_t - _rows(delta, i, bq)[..., None, :])
            ds_c = ds_t.astype(q.dtype)
            dk_j = dk_j + jnp.einsum("bksr,bkrh->bksh", ds_c, q_i,
                                     precision=cfg.precision, preferred_element_type=cdt)
            dq_t_i = jnp.einsum("bkhs,bksr->bkhr", k_t_j, ds_c,
                                precision=cfg.precision, preferred_element_type=cdt)
            start = _idx((0, 0, 0, i * rows))
            dq_t = lax.dynamic_update_slice(dq_t, lax.dynamic_slice(dq_t, start, dq_t_i.shape) + dq_t_i, start)
            if dbias is not None:
                dbias = _add_bias_block(dbias, jnp.swapaxes(ds_t, -1, -2), i, j, cfg)
            return dk_j, dv_j, dq_t, dbias

        start = _idx((0, 0, j * bk, 0))
        if acc is None:
            blocks = vary_like((jnp.zeros((b, kh, bk, h), cdt), jnp.zeros((b, kh, bk, d), cdt)),
                               q, k, v, mask, bias, scale, do)
        else:  # continue the caller's sums
            blocks = (lax.dynamic_slice(dk, start, (b, kh, bk, h)), lax.dynamic_slice(dv, start, (b, kh, bk, d)))
        state = (*blocks, dq_t, dbias)
        for lo, hi, structural in segments:  # masked, full, masked query blocks (static split)
            state = lax.fori_loop(lo[j], hi[j], functools.partial(q_step, structural=structural), state)
        dk_j, dv_j, dq_t, dbias = state
        return (dq_t, lax.dynamic_update_slice(dk, dk_j, start),
                lax.dynamic_update_slice(dv, dv_j, start), dbias)

    if acc is None:
        acc = (jnp.zeros((b, kh, h, tp * g), cdt), jnp.zeros((b, kh, sp, h), cdt), jnp.zeros((b, kh, sp, d), cdt))
        raw = False
    else:
        raw = True
    init = vary_like((*acc, None if bias is None else jnp.zeros(bias.shape, cdt)),
                     q, k, v, mask, bias, scale, do, lse)
    dq_t, dk, dv, dbias = lax.fori_loop(jnp.int32(0), jnp.int32(sp // bk), kv_block, init)
    if raw:
        return dq_t, dk, dv
    dq = dq_from_transposed(dq_t, g)
    # d(logits)/dQ = scale·K: applied once, after the sums. d(logits)/d(scale) =
    # Q·Kᵀ, so d(scale) = Σ dS ∘ QKᵀ = Σ Q ∘ (dS K) = Σ Q ∘ dq (unscaled dq).
    dscale = jnp.sum(dq * q.astype(cdt)).astype(scale.dtype)
    return ((dq * scale).astype(q.dtype), (dk * scale).astype(k.dtype), dv.astype(v.dtype),
            None if bias is None else dbias.astype(bias.dtype), dscale)


def dq_from_transposed(dq_t, g: int):
    """``dQᵀ [B, K, H, Tp·G]`` (the backward's accumulator) -> ``dQ [B, K, Tp, G, H]`` (rows are ``(t, g)``)."""
    b, kh, h, rows = dq_t.shape
    return jnp.moveaxis(dq_t.reshape(b, kh, h, rows // g, g), 2, 4)
