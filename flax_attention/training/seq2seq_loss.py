"""Losses and metrics of seq2seq training (Vaswani et al. 2017, §5.4: label smoothing ``ε_ls = 0.1``).

Padding positions (``tgt_out == PAD_ID``) are excluded from every loss and
metric. The paper's optimiser and Eq. 3 schedule are
:func:`flax_attention.training.steps.make_optimizer` with ``lr_schedule="rsqrt"``.

Shapes follow :mod:`flax_attention`: ``B`` batch, ``T`` target length, ``V`` vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_attention.data.synthetic import EOS_ID, PAD_ID

Array = jnp.ndarray


def smoothed_cross_entropy(logits: Array, targets: Array, label_smoothing: float = 0.1) -> Array:
    """Per-token cross-entropy against a label-smoothed target distribution.

    The smoothed target puts ``1 - ε`` on the label and ``ε / (V - 1)`` on every
    other class (Szegedy et al. 2016). Its own entropy is subtracted, so a
    model that predicts exactly the smoothed distribution scores 0: the number
    then reads as a KL divergence and stays comparable across ``ε``.

    Args:
      logits: ``[..., V]`` (any float dtype; computed in float32).
      targets: integer ``[...]``.
      label_smoothing: ``ε`` in ``[0, 1)``.

    Returns:
      float32 ``[...]`` per-token loss (padding NOT removed: weight it by ``targets != PAD_ID``).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
    v = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    on = 1.0 - label_smoothing
    off = label_smoothing / (v - 1)
    target_dist = jax.nn.one_hot(targets, v, dtype=jnp.float32) * (on - off) + off
    cross = -jnp.sum(target_dist * log_probs, axis=-1)
    # Entropy of the smoothed target (0·log 0 := 0 when ε = 0).
    entropy = -(on * jnp.log(on) + (label_smoothing * jnp.log(off) if off > 0 else 0.0))
    return cross - entropy


def sequence_match(predicted: Array, targets: Array, pad_id: int = PAD_ID, eos_id: int = EOS_ID) -> Array:
    """Exact match of decoded sequences: ``[B, L]`` vs ``[B, T]`` -> bool ``[B]``.

    Both are compared up to and including their first EOS; everything after an
    EOS is ignored. Unequal widths are padded with ``pad_id``.
    """
    width = max(predicted.shape[-1], targets.shape[-1])

    def canonical(x):
        x = jnp.pad(x, [(0, 0), (0, width - x.shape[-1])], constant_values=pad_id)
        seen_eos = jnp.cumsum(x == eos_id, axis=-1) - (x == eos_id)
        return jnp.where(seen_eos > 0, pad_id, x)

    return jnp.all(canonical(predicted) == canonical(targets), axis=-1)
