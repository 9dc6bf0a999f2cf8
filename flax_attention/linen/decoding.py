"""Greedy and beam-search decoding for :class:`flax_attention.linen.transformer.Transformer`.

Both run the encoder once and the decoder one token per step against the
KV cache (``'cache'`` collection), inside a single ``lax.while_loop`` with a
fixed maximum length, so a whole batch decodes in one jitted call and stops
as soon as every sequence has emitted EOS. The first step (BOS) runs before
the loop and computes every cross-attention's keys/values once; the loop
closes over them (``encoded=None``: not carried, not gathered across beams).
Index arithmetic is int32, so both also run under ``jax.enable_x64``.

Outputs are token ids without the leading BOS: ``[B, L]`` (greedy) or
``[B, W, L]`` (beam), ``EOS`` included, ``PAD`` after it. PAD and BOS are
never generated (they are not valid outputs); the remaining log-probabilities
are not renormalised, so beam scores are the model's own log p(y).

Beam search scores a finished hypothesis of ``n`` tokens (EOS included) by
``log p(y) / lp(n)`` with the GNMT length penalty (Wu et al. 2016, Eq. 14)
``lp(n) = ((5 + n) / 6) ** alpha``; ``alpha = 0`` ranks by log-probability.
"""

from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from flax_attention.core.reductions import argmax
from flax_attention.linen.transformer import init_cache

Array = jnp.ndarray
# The token convention of every decoder here (the data pipelines use the same ids).
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_NEG_INF = -1e30  # finite "minus infinity": keeps top_k and comparisons NaN-free


def length_penalty(length, alpha: float) -> Array:
    """GNMT length penalty ``((5 + length) / 6) ** alpha``."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _split_memory(cache):
    """``(cache without the cross-attention memory, that memory as a flat dict)``.

    The memory is constant after the first step, so the loop closes over it
    instead of carrying (and, in beam search, gathering) it.
    """
    flat = traverse_util.flatten_dict(cache)
    memory = {k: v for k, v in flat.items() if "cross_attention" in k}
    rest = {k: v for k, v in flat.items() if "cross_attention" not in k}
    return traverse_util.unflatten_dict(rest), memory


def _join_memory(cache, memory):
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(cache), **memory})


def _encode(model, params, src):
    return model.apply({"params": params}, src, deterministic=True, method=model.encode)


def _step(model, params, cache, tokens, encoded, src, forbidden):
    """One cached decoder step: ``tokens [B]`` -> (log-probs ``[B, V]``, new cache).

    ``encoded=None`` reuses the cross-attention keys/values cached by the
    first step. The ``forbidden`` ids (PAD and BOS) get log-probability
    ``_NEG_INF`` without renormalising, so scores stay the model's true
    log-probabilities.
    """
    logits, mutated = model.apply(
        {"params": params, "cache": cache}, tokens[:, None], encoded, src,
        deterministic=True, decode=True, method=model.decode, mutable=["cache"],
    )
    log_probs = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)
    banned = jnp.isin(jnp.arange(log_probs.shape[-1]), jnp.asarray(forbidden))
    return jnp.where(banned, _NEG_INF, log_probs), mutated["cache"]


@functools.partial(jax.jit, static_argnames=("model", "max_len", "bos_id", "eos_id", "pad_id"))
def greedy_decode(
    model, params, src: Array, *, max_len: int, bos_id: int = BOS_ID, eos_id: int = EOS_ID,
    pad_id: int = PAD_ID,
) -> Array:
    """Greedy (argmax) decoding with the KV cache.

    Args:
      model: a ``Transformer`` (static: hashed by its config).
      params: its parameters.
      src: int ``[B, S]`` source tokens, ``pad_id``-padded.
      max_len: ``L``, the most tokens generated per sequence (EOS included).

    Returns:
      int32 ``[B, L]``: the tokens after BOS, ``pad_id`` after the first EOS.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}.")
    b = src.shape[0]
    encoded = _encode(model, params, src)
    cache = init_cache(model, b, max_len)

    def cond(state):
        i, _, _, _, done = state
        return (i < max_len) & ~jnp.all(done)

    def body(state, memory, encoded_or_none=None):
        i, cache, out, last, done = state
        log_probs, cache = _step(model, params, _join_memory(cache, memory), last, encoded_or_none, src,
                                 (pad_id, bos_id))
        cache, new_memory = _split_memory(cache)
        tok = jnp.where(done, pad_id, argmax(log_probs)).astype(jnp.int32)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (jnp.zeros_like(i), i))
        return (i + 1, cache, out, tok, done | (tok == eos_id)), new_memory

    state = (
        jnp.int32(0), cache, jnp.full((b, max_len), pad_id, jnp.int32),
        jnp.full((b,), bos_id, jnp.int32), jnp.zeros((b,), bool),
    )
    state, memory = body(state, {}, encoded)  # step 0 fills the cross-attention memory
    return jax.lax.while_loop(cond, lambda st: body(st, memory)[0], state)[2]


def _gather_beams(tree, beam_idx: Array, batch: int, beams: int):
    """Reorders every ``[B*W, ...]`` leaf by ``beam_idx [B, W]`` (source beam of each new beam).

    Leaves without that leading axis are left as they are (the loop carries
    no cross-attention memory: it is the same for all beams of an example).
    """
    flat = (jnp.arange(batch, dtype=jnp.int32)[:, None] * beams + beam_idx).reshape(-1)

    def gather(x):
        if x.ndim == 0 or x.shape[0] != batch * beams:
            return x
        return x[flat]

    return jax.tree_util.tree_map(gather, tree)


@functools.partial(
    jax.jit, static_argnames=("model", "beam_size", "max_len", "alpha", "bos_id", "eos_id", "pad_id"))
def beam_search(
    model, params, src: Array, *, beam_size: int, max_len: int, alpha: float = 0.6,
    bos_id: int = BOS_ID, eos_id: int = EOS_ID, pad_id: int = PAD_ID,
) -> Tuple[Array, Array]:
    """Batched beam search with the KV cache and the GNMT length penalty.

    Each step extends the ``W`` live hypotheses by every token, keeps the best
    ``2W`` extensions (so at least ``W`` of them do not end in EOS), moves the
    EOS-ending ones among the best ``W`` into the finished set (scored
    ``log p / lp(n)``) and keeps the best ``W`` others alive; a ``W`` at least
    the number of candidates is exact search. ``W = 1`` is greedy decoding
    for every ``alpha`` (an element stops at its first EOS). A batch element stops once its worst finished
    score beats ``best live log p / lp(L)``: log-probabilities only fall and,
    for ``alpha >= 0``, ``lp(L)`` is the largest penalty, so that is an upper
    bound on anything still alive. The loop ends when every element stopped.

    Args:
      model: a ``Transformer``.
      params: its parameters.
      src: int ``[B, S]``.
      beam_size: ``W``.
      max_len: ``L``, most tokens per hypothesis (EOS included).
      alpha: length-penalty exponent, ``>= 0``.

    Returns:
      ``(tokens [B, W, L], scores [B, W])``: the finished hypotheses (ending in
      EOS) best first, then, if fewer than ``W`` finished within ``L`` tokens,
      the best unfinished live ones (no EOS: that marks them), best first,
      scored ``log p / lp(n)`` for their ``n`` tokens. Only if fewer than ``W``
      hypotheses exist at all (a tiny vocabulary) is a slot left all-PAD with
      score ``-1e30``.
    """
    if beam_size < 1 or max_len < 1:
        raise ValueError(f"beam_size and max_len must be >= 1, got {beam_size}, {max_len}.")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (the early-stopping bound needs it), got {alpha}.")
    b, w = src.shape[0], beam_size
    src_w = jnp.repeat(src, w, axis=0)
    encoded = jnp.repeat(_encode(model, params, src), w, axis=0)
    cache = init_cache(model, b * w, max_len)
    max_penalty = length_penalty(max_len, alpha)

    def cond(state):
        i, _, _, alive_lp, _, fin_score = state
        bound = jnp.max(alive_lp, axis=-1) / max_penalty
        stopped = fin_score[:, -1] >= bound
        if w == 1:  # greedy: done at the first EOS
            stopped = stopped | (fin_score[:, 0] > _NEG_INF / 2)
        return (i < max_len) & ~jnp.all(stopped)

    def body(state, memory, encoded_or_none=None):
        i, cache, alive_seq, alive_lp, fin_seq, fin_score = state
        last = jax.lax.dynamic_index_in_dim(alive_seq, jnp.maximum(i - 1, 0), axis=2, keepdims=False)
        last = jnp.where(i == 0, bos_id, last).reshape(b * w)
        log_probs, cache = _step(model, params, _join_memory(cache, memory), last, encoded_or_none, src_w,
                                 (pad_id, bos_id))
        cache, new_memory = _split_memory(cache)
        v = log_probs.shape[-1]
        cand = (alive_lp[:, :, None] + log_probs.reshape(b, w, v)).reshape(b, w * v)
        cand_lp, cand_idx = jax.lax.top_k(cand, 2 * w)                 # [B, 2W]
        src_beam, tok = cand_idx // v, (cand_idx % v).astype(jnp.int32)
        seqs = jnp.take_along_axis(alive_seq, src_beam[:, :, None], axis=1)
        zero = jnp.zeros_like(i)
        seqs = jax.lax.dynamic_update_slice(seqs, tok[:, :, None], (zero, zero, i))
        is_eos = tok == eos_id

        # Live set: best W extensions that did not end in EOS.
        live_lp = jnp.where(is_eos, _NEG_INF, cand_lp)
        alive_lp, keep = jax.lax.top_k(live_lp, w)
        alive_seq = jnp.take_along_axis(seqs, keep[:, :, None], axis=1)
        cache = _gather_beams(cache, jnp.take_along_axis(src_beam, keep, axis=1), b, w)

        # Finished set: merge old finished with the new EOS-ending extensions.
        # As in fairseq, an EOS extension is only finished if it ranks among the
        # top W candidates. With W = 1 an element is also frozen at its first
        # finished hypothesis (greedy stops at its EOS): otherwise the runner-up
        # kept alive could win later through the length penalty (alpha > 0).
        in_top_w = jnp.arange(2 * w) < w
        finishes = is_eos & in_top_w & (cand_lp > _NEG_INF / 2)
        if w == 1:
            finishes = finishes & (fin_score[:, :1] <= _NEG_INF / 2)
        new_score = jnp.where(finishes, cand_lp / length_penalty(i + 1, alpha), _NEG_INF)
        all_score = jnp.concatenate([fin_score, new_score], axis=1)
        all_seq = jnp.concatenate([fin_seq, seqs], axis=1)
        fin_score, top = jax.lax.top_k(all_score, w)
        fin_seq = jnp.take_along_axis(all_seq, top[:, :, None], axis=1)
        return (i + 1, cache, alive_seq, alive_lp, fin_seq, fin_score), new_memory

    seq0 = jnp.full((b, w, max_len), pad_id, jnp.int32)
    # Only beam 0 is live at the start; the others would duplicate it.
    lp0 = jnp.tile(jnp.array([0.0] + [_NEG_INF] * (w - 1), jnp.float32), (b, 1))
    state = (jnp.int32(0), cache, seq0, lp0, seq0, jnp.full((b, w), _NEG_INF, jnp.float32))
    state, memory = body(state, {}, encoded)  # step 0 fills the cross-attention memory
    steps, _, alive_seq, alive_lp, fin_seq, fin_score = jax.lax.while_loop(
        cond, lambda st: body(st, memory)[0], state)

    # Fill the slots no finished hypothesis took with the best live ones
    # (all `steps` tokens long, no EOS), scored with the same length penalty.
    live_score = jnp.where(alive_lp > _NEG_INF / 2, alive_lp / length_penalty(steps, alpha), _NEG_INF)
    n_fin = jnp.sum(fin_score > _NEG_INF / 2, axis=1, dtype=jnp.int32)[:, None]  # [B, 1]
    slot = jnp.arange(w, dtype=jnp.int32)[None, :]
    take_live = slot >= n_fin
    live_idx = jnp.clip(slot - n_fin, 0, w - 1)
    live_seq = jnp.where((live_score > _NEG_INF / 2)[:, :, None], alive_seq, pad_id)
    tokens = jnp.where(take_live[:, :, None],
                       jnp.take_along_axis(live_seq, live_idx[:, :, None], axis=1), fin_seq)
    scores = jnp.where(take_live, jnp.take_along_axis(live_score, live_idx, axis=1), fin_score)
    return tokens, scores
