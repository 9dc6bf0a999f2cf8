"""Input checks and masks of a decoder-only language model, shared by its linen and NNX modules.

Pure functions over the token array ``[B, T]`` (shape legend: :mod:`flax_attention`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention.functional.masks import padding_mask, segment_mask

Array = jnp.ndarray


def check_tokens(tokens, vocab_size: int, max_length: int, what: str = "tokens") -> None:
    """Raises a one-line ValueError for a bad token array.

    Checks an integer ``[B, T]`` array with ``T <= max_length`` and, when the
    values are concrete (not traced under ``jit``), every id in ``[0, vocab_size)``.
    Traced ids cannot raise; :func:`valid_tokens` lets a model make their rows NaN instead.
    """
    if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{what} must be an integer array [B, T], got "
                         f"{getattr(tokens, 'dtype', type(tokens).__name__)} {getattr(tokens, 'shape', '')}.")
    if tokens.shape[1] > max_length:
        raise ValueError(f"{what} length T={tokens.shape[1]} exceeds max_length={max_length}; "
                         "truncate the input or raise max_length.")
    if not isinstance(tokens, jax.core.Tracer):
        arr = np.asarray(tokens)
        bad = arr[(arr < 0) | (arr >= vocab_size)]
        if bad.size:
            raise ValueError(f"{what} contain id {int(bad[0])} outside the vocabulary [0, {vocab_size}); "
                             "encode with the model's own tokenizer (or raise vocab_size).")


def valid_tokens(tokens: Array, vocab_size: int) -> Array:
    """Boolean ``[B, T]``: the ids inside ``[0, vocab_size)``."""
    return (tokens >= 0) & (tokens < vocab_size)


def lm_mask(shape: Tuple[int, int], segment_ids: Optional[Array] = None, lengths: Optional[Array] = None,
            positions: Optional[Array] = None) -> Optional[Array]:
    """The non-causal part of an LM's self-attention mask (causality is the attention's own).

    Args:
      shape: ``(B, T)`` of the tokens.
      segment_ids: int ``[B, T]`` documents of a packed row, ``0`` = padding: a
        token sees only its own document.
      lengths: int ``[B]``: positions ``>= lengths`` are padding (segment 0).
      positions: int ``[B, T]`` or ``None``; only its shape is checked here.

    Returns:
      Boolean ``[B, 1, T, T]`` or ``None`` (nothing to mask).
    """
    if segment_ids is not None and jnp.shape(segment_ids) != tuple(shape):
        raise ValueError(f"segment_ids {jnp.shape(segment_ids)} must have the tokens' shape {tuple(shape)}.")
    if positions is not None and jnp.shape(positions) != tuple(shape):
        raise ValueError(f"positions {jnp.shape(positions)} must have the tokens' shape {tuple(shape)}.")
    ids = None if segment_ids is None else jnp.asarray(segment_ids)
    if lengths is not None:
        real = padding_mask(jnp.asarray(lengths), shape[1])
        ids = jnp.where(real, 1 if ids is None else ids, 0).astype(jnp.int32)
    return None if ids is None else segment_mask(ids)


def call_mask(shape: Tuple[int, int], decode: bool, positions: Optional[Array], segment_ids: Optional[Array],
              lengths: Optional[Array]) -> Tuple[Optional[Array], Optional[Array]]:
    """``(mask, lengths)`` for one call of either LM twin (linen and NNX share this rule).

    Decoding reads positions from the cache, so it takes neither ``positions``
    nor ``segment_ids`` and hands ``lengths`` (right-padded prompts) to the
    cache; otherwise the packed-row mask of :func:`lm_mask` carries the
    lengths and the attention adds causality.

    Raises:
      ValueError: ``decode`` with ``positions`` or ``segment_ids``.
    """
    if decode:
        if positions is not None or segment_ids is not None:
            raise ValueError("decode=True reads positions from the cache: pass neither positions nor segment_ids "
                             "(right-padded prompts: pass lengths [B]).")
        return None, lengths
    return lm_mask(shape, segment_ids, lengths, positions), None


def rows_at(hidden: Array, logits_at: Optional[Array]) -> Array:
    """``hidden [B, T, E]`` at one position per row, ``logits_at`` int ``[B]``: ``[B, 1, E]`` (``None``: all).

    A model's ``logits_at`` argument: generation needs only each prompt's last
    position, and projecting ``T`` rows onto the vocabulary instead of one is most
    of a prefill's work (``T·E·V`` multiply-adds). Concrete positions outside
    ``[0, T)`` raise; traced ones are clamped by the gather.
    """
    if logits_at is None:
        return hidden
    b, t = hidden.shape[:2]
    at = jnp.asarray(logits_at)
    if at.shape != (b,) or not jnp.issubdtype(at.dtype, jnp.integer):
        raise ValueError(f"logits_at must be int [B={b}] (one position per row), got {at.dtype} {at.shape}.")
    if not isinstance(at, jax.core.Tracer) and ((np.asarray(at) < 0) | (np.asarray(at) >= t)).any():
        raise ValueError(f"logits_at must be in [0, T={t}), got {np.asarray(at).tolist()}.")
    return jnp.take_along_axis(hidden, at.astype(jnp.int32)[:, None, None], axis=1)
