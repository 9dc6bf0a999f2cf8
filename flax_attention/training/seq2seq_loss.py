"""Losses and metrics of seq2seq training (Vaswani et al. 2017, §5.4: label smoothing ``ε_ls = 0.1``).

Padding positions (``tgt_out == PAD_ID``) are excluded from every loss and
metric. The paper's optimiser and Eq. 3 schedule are
:func:`flax_attention.training.steps.make_optimizer` with ``lr_schedule="rsqrt"``.

Shapes follow :mod:`flax_attention`: ``B`` batch, ``T`` target length, ``V`` vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention.data.synthetic import EOS_ID, PAD_ID

Array = jnp.ndarray


def smoothed_cross_entropy(logits: Array, targets: Array, label_smoothing: float = 0.1) -> Array:
    """Per-token cross-entropy against a label-smoothed target distribution.

    The smoothed target puts ``1 - ε`` on the label and ``ε / (V - 1)`` on every
    other class (Szegedy et al. 2016). Its own entropy is subtracted, so a
    model that predicts exactly the smoothed distribution scores 0: the number
    then reads as a KL divergence and stays comparable across ``ε``.

    Computed without a ``[..., V]`` target distribution or log-probabilities:
    the target weights sum to 1, so ``-Σ_v q_v log p_v = logsumexp(x) -
    (on - off)·x_label - off·Σ_v x_v``. That saves two ``[..., V]`` passes over
    the largest tensor of a translation step (measured in
    ``benchmarks/results/cpu_levers.md``).

    Args:
      logits: ``[..., V]`` (any float dtype; computed in at least float32).
      targets: integer ``[...]`` in ``[0, V)``.
      label_smoothing: ``ε`` in ``[0, 1)``.

    Returns:
      ``[...]`` per-token loss, float32 (float64 for float64 logits); padding
      NOT removed: weight it by ``targets != PAD_ID``.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
    v = logits.shape[-1]
    x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    on = 1.0 - label_smoothing
    off = label_smoothing / (v - 1)
    label = jnp.take_along_axis(x, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    cross = jax.nn.logsumexp(x, axis=-1) - (on - off) * label
    if off > 0:
        cross = cross - off * jnp.sum(x, axis=-1)
    # Entropy of the smoothed target (0·log 0 := 0 when ε = 0).
    entropy = -(on * np.log(on) + (label_smoothing * np.log(off) if off > 0 else 0.0))
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
