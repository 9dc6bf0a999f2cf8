"""Model-agnostic pieces of the training program: state, optimiser, pmapped steps, metric sums.

A *task* (see :mod:`flax_attention.training.tasks`) supplies one function,
``loss_and_metrics(params, apply_fn, batch, rngs, train) -> (loss_sum, sums)``
where ``loss_sum`` is the weighted sum of per-example losses of the local
shard and ``sums`` a dict of weighted metric sums that includes ``"weight"``
(the number of real examples). Everything here is generic over that contract.

Data parallelism: every step runs under :func:`jax.pmap` over all local
devices with axis name ``"batch"``. The local loss is divided by the *global*
example count (``psum`` of the weights), so the ``psum`` of the local
gradients is exactly the gradient of the global-batch mean loss, whatever the
device count: 1 and N devices follow the same trajectory up to float rounding.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from flax_attention.training.config import TrainConfig

AXIS = "batch"
Batch = Dict[str, np.ndarray]
LossFn = Callable[..., Tuple[jax.Array, Dict[str, jax.Array]]]


class TrainState(train_state.TrainState):
    """optax TrainState plus the base dropout key (checkpointed with the rest)."""

    dropout_key: jax.Array


def all_finite(tree) -> bool:
    """Whether every floating-point leaf of ``tree`` (host or device arrays) is finite."""
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]
    return all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))


def create_train_state(model, init_inputs: Tuple, config: TrainConfig, rng: jax.Array,
                       total_steps: int = 1, wrap_optimizer: Optional[Callable] = None) -> TrainState:
    """Initialises parameters and the Adam optimiser (unreplicated).

    Args:
      total_steps: length of the whole run in optimiser steps; the horizon of a
        decaying ``config.lr_schedule`` and of the cooldown.
      wrap_optimizer: optional ``(tx, params) -> tx`` adapting the optimiser to
        the parameter tree (a frozen table, per-layer rates): a task's
        :attr:`~flax_attention.training.task.Task.optimizer`.
    """
    init_key, dropout_key = jax.random.split(rng)
    variables = jax.jit(lambda k: model.init(k, *init_inputs))(init_key)
    tx = make_optimizer(config, max(int(total_steps), 1))
    if wrap_optimizer is not None:
        tx = wrap_optimizer(tx, variables["params"])
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx, dropout_key=dropout_key)


def learning_rate_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """The rate of optimiser update ``count`` (0-based) as ``config`` describes it.

    ``rsqrt`` is Vaswani et al. (2017) Eq. 3, ``d^-0.5 min(s^-0.5, s w^-1.5)``
    with ``s = count + 1``, rescaled so that its peak (at ``s = w``) is
    ``learning_rate``: the paper's rate for ``d_model = E`` is
    ``learning_rate = (E w)^-0.5``. The cooldown (not in the paper, which
    averages checkpoints instead) then decays linearly to 0 over the last
    ``cooldown_fraction`` of the updates; the last update still moves by ``1/c``.
    """
    peak, warmup = config.learning_rate, config.warmup_steps
    if config.lr_schedule == "rsqrt":
        def base(count):
            s = jnp.asarray(count, jnp.float32) + 1.0
            return peak * jnp.minimum(s / warmup, jnp.sqrt(warmup / s))
    elif config.lr_schedule == "cosine":
        base = (optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total_steps) if warmup
                else optax.cosine_decay_schedule(peak, total_steps))
    else:
        base = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    start = config.cooldown_start(total_steps)
    cooldown = total_steps - start
    if cooldown == 0:
        return base

    def cooled(count):
        count = jnp.asarray(count, jnp.float32)
        ramp = jnp.clip((total_steps - count) / cooldown, 0.0, 1.0)
        return jnp.where(count < start, base(count), base(start) * ramp)

    return cooled


@functools.lru_cache(maxsize=None)
def make_optimizer(config: TrainConfig, total_steps: int = 1) -> optax.GradientTransformation:
    """Adam(0.9, ``adam_b2``, ``adam_eps``) on :func:`learning_rate_schedule`, after optional clipping."""
    # apply_fn and tx are static TrainState fields, i.e. part of the pmap cache
    # key: reusing the same objects lets a second run in one process skip compiling.
    if config.lr_schedule == "constant" and not config.warmup_steps and not config.cooldown_fraction:
        lr = config.learning_rate  # a plain float: the optimiser state of older constant-rate runs
    else:
        lr = learning_rate_schedule(config, total_steps)
    adam = optax.adam(lr, b1=0.9, b2=config.adam_b2, eps=config.adam_eps)
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adam) if config.clip_norm else adam


def _global_mean_loss(loss_fn: LossFn, params, apply_fn, batch, rngs, train):
    loss_sum, sums = loss_fn(params, apply_fn, batch, rngs, train)
    total = jax.lax.psum(sums["weight"], AXIS)
    return loss_sum / jnp.maximum(total, 1.0), sums


@functools.lru_cache(maxsize=None)  # one pmapped function per loss: repeated runs in a process reuse compilations
def make_train_step(loss_fn: LossFn) -> Callable:
    """pmapped ``(state, batch) -> (state, metric sums)`` (sums are over all devices)."""

    def train_step(state: TrainState, batch: Batch):
        # Distinct dropout key per step and per device.
        key = jax.random.fold_in(jax.random.fold_in(state.dropout_key, state.step), jax.lax.axis_index(AXIS))
        grad_fn = jax.value_and_grad(_global_mean_loss, argnums=1, has_aux=True)
        (_, sums), grads = grad_fn(loss_fn, state.params, state.apply_fn, batch, {"dropout": key}, True)
        grads = jax.lax.psum(grads, AXIS)  # local losses already divide by the global count
        return state.apply_gradients(grads=grads), jax.lax.psum(sums, AXIS)

    return jax.pmap(train_step, axis_name=AXIS, donate_argnums=(0,))


@functools.lru_cache(maxsize=None)
def make_eval_step(loss_fn: LossFn) -> Callable:
    """pmapped ``(params, batch) -> metric sums`` over all devices (no dropout)."""

    def eval_step(state: TrainState, batch: Batch):
        _, sums = loss_fn(state.params, state.apply_fn, batch, {}, False)
        return jax.lax.psum(sums, AXIS)

    return jax.pmap(eval_step, axis_name=AXIS)


@functools.lru_cache(maxsize=None)
def _pmap_identity() -> Callable:
    return jax.pmap(lambda x: x, axis_name=AXIS)


def replicate(tree):
    """One copy per local device, with the sharding the pmapped steps return.

    ``flax.jax_utils.replicate`` alone gives arrays on a differently named
    mesh, so the train step's *second* call (fed its own outputs) would miss
    the compilation cache and compile the whole step again.
    """
    return _pmap_identity()(flax.jax_utils.replicate(tree))


def unreplicate(tree):
    return flax.jax_utils.unreplicate(tree)


class MetricAccumulator:
    """Sums per-step metric dicts on device; fetches them only when asked."""

    def __init__(self):
        self._pending = []
        self.totals: Dict[str, float] = {}

    def add(self, sums) -> None:
        self._pending.append(sums)

    def fetch(self) -> Dict[str, float]:
        """Brings pending sums to the host (a sync point) and returns running totals."""
        for sums in jax.device_get(self._pending):
            for k, v in sums.items():
                # pmap outputs are replicated [devices]; psum made them equal.
                self.totals[k] = self.totals.get(k, 0.0) + float(np.asarray(v).reshape(-1)[0])
        self._pending = []
        return dict(self.totals)


def summarize(totals: Dict[str, float]) -> Dict[str, float]:
    """Turns weighted sums into means: every key except ``weight`` is divided by it."""
    w = max(totals.get("weight", 0.0), 1.0)
    out = {k: v / w for k, v in totals.items() if k != "weight"}
    out["examples"] = totals.get("weight", 0.0)
    return out


