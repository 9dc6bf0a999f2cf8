"""Losses, metrics, the paper's optimiser and jit/pmap-friendly steps for seq2seq training.

Vaswani et al. (2017), §5.3-5.4: Adam with ``β1 = 0.9, β2 = 0.98, ε = 1e-9``,
learning rate ``d_model^-0.5 · min(step^-0.5, step · warmup^-1.5)`` (Eq. 3),
label smoothing ``ε_ls = 0.1``. Padding positions (``tgt_out == PAD_ID``) are
excluded from every loss and metric. :func:`with_linear_cooldown` optionally
anneals any schedule to 0 at the end of training (not in the paper, which
averages checkpoints instead).

Shapes follow :mod:`flax_attention`: ``B`` batch, ``T`` target length, ``V`` vocabulary.
:func:`flax_attention.seq2seq_train.train_seq2seq` is the training loop.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from flax_attention.data.tasks import EOS_ID, PAD_ID

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
      float32 ``[...]`` per-token loss (padding NOT removed; see :func:`masked_loss`).
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


def masked_loss(logits: Array, targets: Array, label_smoothing: float = 0.1, pad_id: int = PAD_ID):
    """Summed smoothed loss over non-padding tokens, and their count.

    Returning sums (not means) lets data-parallel callers ``psum`` both and
    divide once, so every token weighs the same whatever the device split.

    Args:
      logits: ``[B, T, V]``.
      targets: ``[B, T]``.

    Returns:
      ``(loss_sum, num_tokens)``, float32 scalars.
    """
    weights = (targets != pad_id).astype(jnp.float32)
    loss = smoothed_cross_entropy(logits, targets, label_smoothing)
    return jnp.sum(loss * weights), jnp.sum(weights)


def token_metrics(logits: Array, targets: Array, pad_id: int = PAD_ID) -> Dict[str, Array]:
    """Padding-excluded token accuracy and exact sequence match under teacher forcing.

    Args:
      logits: ``[B, T, V]``.
      targets: ``[B, T]`` (``tgt_out``, padding = ``pad_id``).

    Returns:
      Sums, to be divided by the counts: ``correct`` (tokens), ``tokens``,
      ``exact`` (sequences with every real token right), ``sequences``.
    """
    real = targets != pad_id
    hit = (jnp.argmax(logits, axis=-1) == targets) & real
    exact = jnp.all(hit | ~real, axis=-1)
    return {
        "correct": jnp.sum(hit).astype(jnp.float32),
        "tokens": jnp.sum(real).astype(jnp.float32),
        "exact": jnp.sum(exact).astype(jnp.float32),
        "sequences": jnp.float32(targets.shape[0]),
    }


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


def transformer_schedule(d_model: int, warmup_steps: int = 4000, scale: float = 1.0) -> optax.Schedule:
    """The paper's learning rate (Eq. 3): ``scale · d_model^-0.5 · min(s^-0.5, s · warmup^-1.5)``.

    ``s`` is the 1-based step (optax counts from 0), so the first update
    already has a non-zero rate. Peak ``scale · (d_model · warmup)^-0.5`` at ``s = warmup``.
    """
    if warmup_steps < 1 or d_model < 1:
        raise ValueError(f"need warmup_steps >= 1 and d_model >= 1, got {warmup_steps}, {d_model}.")

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)

    return schedule


def with_linear_cooldown(schedule: optax.Schedule, total_steps: int, cooldown_fraction: float) -> optax.Schedule:
    """Follows ``schedule``, then decays linearly to 0 over the last ``cooldown_fraction`` of training.

    Eq. 3 decays only as ``step^-0.5``: at the end of a short run the rate is
    still about half its peak, and the held-out accuracy of the *final*
    parameters swings from update to update. Annealing to zero (the
    "warmup-stable-decay" / trapezoidal recipe; the paper instead averages the
    last checkpoints, §6.1) lets the run settle into the minimum it has found.
    With ``c = round(cooldown_fraction · total_steps)`` cooldown updates and
    ``s0 = total_steps - c``, update ``i >= s0`` (0-based) uses
    ``schedule(s0) · (total_steps - i) / c``: the last update still moves, by ``1/c`` of the rate.

    Args:
      schedule: the base schedule (e.g. :func:`transformer_schedule`).
      total_steps: number of optimiser updates of the run.
      cooldown_fraction: in ``[0, 1]``; ``0`` returns ``schedule`` unchanged.
    """
    if not 0.0 <= cooldown_fraction <= 1.0 or total_steps < 1:
        raise ValueError(f"need cooldown_fraction in [0, 1] and total_steps >= 1, got "
                         f"{cooldown_fraction}, {total_steps}.")
    cooldown = int(round(cooldown_fraction * total_steps))
    if cooldown == 0:
        return schedule
    start = total_steps - cooldown

    def cooled(count):
        count = jnp.asarray(count, jnp.float32)
        ramp = jnp.clip((total_steps - count) / cooldown, 0.0, 1.0)
        return jnp.where(count < start, schedule(count), schedule(start) * ramp)

    return cooled


def transformer_optimizer(
    learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.98, eps: float = 1e-9,
    clip_norm: Optional[float] = None,
) -> optax.GradientTransformation:
    """Adam(0.9, 0.98, 1e-9) as in the paper, optionally after global-norm clipping."""
    adam = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    return adam if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adam)


class TrainState(train_state.TrainState):
    """Flax TrainState plus the dropout key (folded with the step, so each step differs)."""

    dropout_rng: jax.Array = None


def make_train_step(
    model, label_smoothing: float = 0.1, axis_name: Optional[str] = None
) -> Callable[[TrainState, Dict[str, Array]], tuple]:
    """Builds ``train_step(state, batch) -> (state, metrics)`` for teacher forcing.

    ``batch`` holds ``src [B, S]``, ``tgt_in [B, T]``, ``tgt_out [B, T]``. Wrap
    the result in ``jax.jit`` or, with ``axis_name`` set, in
    ``jax.pmap(..., axis_name=axis_name)``: gradients and metric sums are then
    summed over devices before one division by the global token count.

    Returns metrics as sums: ``loss``, ``correct``, ``tokens``, ``exact``, ``sequences``.
    """

    def reduce(x):
        return x if axis_name is None else jax.lax.psum(x, axis_name)

    def train_step(state: TrainState, batch: Dict[str, Array]):
        rng = jax.random.fold_in(state.dropout_rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

        def loss_fn(params):
            logits = state.apply_fn(
                {"params": params}, batch["src"], batch["tgt_in"], deterministic=False,
                rngs={"dropout": rng},
            )
            loss_sum, tokens = masked_loss(logits, batch["tgt_out"], label_smoothing)
            # Divide by the global token count so psum-ed grads are the global mean.
            return loss_sum / jnp.maximum(reduce(tokens), 1.0), (loss_sum, logits)

        grads, (loss_sum, logits) = jax.grad(loss_fn, has_aux=True)(state.params)
        grads = reduce(grads)
        state = state.apply_gradients(grads=grads)
        metrics = {"loss": loss_sum, **token_metrics(logits, batch["tgt_out"])}
        return state, jax.tree_util.tree_map(reduce, metrics)

    return train_step


def make_eval_step(model, label_smoothing: float = 0.1, axis_name: Optional[str] = None):
    """Builds ``eval_step(params, batch) -> metric sums`` (teacher forcing, no dropout)."""

    def eval_step(params: Any, batch: Dict[str, Array]):
        logits = model.apply({"params": params}, batch["src"], batch["tgt_in"], deterministic=True)
        loss_sum, _ = masked_loss(logits, batch["tgt_out"], label_smoothing)
        metrics = {"loss": loss_sum, **token_metrics(logits, batch["tgt_out"])}
        if axis_name is not None:
            metrics = jax.lax.psum(metrics, axis_name)
        return metrics

    return eval_step


def summarize(sums: Dict[str, Array]) -> Dict[str, float]:
    """Metric sums -> means: ``loss`` per token, ``token_acc``, ``exact_match``."""
    tokens = max(float(sums["tokens"]), 1.0)
    return {
        "loss": float(sums["loss"]) / tokens,
        "token_acc": float(sums["correct"]) / tokens,
        "exact_match": float(sums["exact"]) / max(float(sums["sequences"]), 1.0),
    }
