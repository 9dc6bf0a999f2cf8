"""Model-agnostic pieces of the training program: config, state, pmapped steps.

A *task* (see :mod:`flax_attention.tasks`) supplies one function,
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

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

AXIS = "batch"
Batch = Dict[str, np.ndarray]
LossFn = Callable[..., Tuple[jax.Array, Dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping settings (model-independent).

    Attributes:
      learning_rate: Adam learning rate (the peak of the schedule).
      lr_schedule: ``"cosine"`` decays the rate to zero over the whole run
        (``num_epochs`` x steps per epoch; Loshchilov & Hutter 2017, no
        restarts); ``"constant"`` keeps it fixed.
      batch_size: global batch size, split evenly over local devices.
      num_epochs: passes over the training split.
      seed: seeds initialisation, dropout and the shuffle order.
      checkpoint_every: also checkpoint every N steps (0 = only at epoch ends).
      keep_checkpoints: newest checkpoints kept (the best one is kept as well).
      log_every: fetch metrics / update the progress bar every N steps.
      eval_batch_size: global evaluation batch (0 = batch_size).
    """

    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"
    batch_size: int = 256
    num_epochs: int = 3
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_batch_size: int = 0

    # Fields that may change when resuming a workdir (they do not alter what
    # has been trained so far).
    RESUMABLE_CHANGES = ("num_epochs", "checkpoint_every", "keep_checkpoints", "log_every", "eval_batch_size")
    SCHEDULES = ("cosine", "constant")
    # Fields added after workdirs were written -> the value those older runs used.
    ADDED_FIELDS = {"lr_schedule": "constant"}

    def __post_init__(self):
        for name in ("batch_size", "num_epochs", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}.")
        if self.lr_schedule not in self.SCHEDULES:
            raise ValueError(f"--lr_schedule must be one of {', '.join(self.SCHEDULES)}; got {self.lr_schedule!r}.")
        if self.checkpoint_every < 0 or self.eval_batch_size < 0:
            raise ValueError("--checkpoint_every and --eval_batch_size must be >= 0.")

    @classmethod
    def added_fields(cls) -> Dict[str, Any]:
        """:attr:`ADDED_FIELDS` as ``{"train.field": value}`` (see :func:`~flax_attention.checkpointing.load_config`)."""
        return {f"train.{k}": v for k, v in cls.ADDED_FIELDS.items()}

    def resumable_changes(self) -> Tuple[str, ...]:
        """Fields a resumed run may change; a decaying schedule is laid out over ``num_epochs``, so it is fixed."""
        if self.lr_schedule == "constant":
            return self.RESUMABLE_CHANGES
        return tuple(k for k in self.RESUMABLE_CHANGES if k != "num_epochs")


class TrainState(train_state.TrainState):
    """optax TrainState plus the base dropout key (checkpointed with the rest)."""

    dropout_key: jax.Array


def maybe_initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> bool:
    """Joins a multi-process run if flags or ``JAX_COORDINATOR_ADDRESS`` etc. ask for one.

    See :mod:`flax_attention.distributed`; single-process runs never touch
    :mod:`jax.distributed`.
    """
    from flax_attention import distributed
    return distributed.initialize(distributed.resolve(coordinator_address, num_processes, process_id))


class DivergenceError(RuntimeError):
    """The training loss became NaN/Inf; the last finite checkpoint is kept."""


def all_finite(tree) -> bool:
    """Whether every floating-point leaf of ``tree`` (host or device arrays) is finite."""
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]
    return all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))


def create_train_state(model, init_inputs: Tuple, config: TrainConfig, rng: jax.Array,
                       total_steps: int = 1) -> TrainState:
    """Initialises parameters and the Adam optimiser (unreplicated).

    Args:
      total_steps: length of the whole run in optimiser steps; the horizon of a
        decaying ``config.lr_schedule`` (ignored by ``"constant"``).
    """
    init_key, dropout_key = jax.random.split(rng)
    variables = jax.jit(lambda k: model.init(k, *init_inputs))(init_key)
    tx = make_optimizer(config.learning_rate, config.lr_schedule, max(int(total_steps), 1))
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx, dropout_key=dropout_key)


@functools.lru_cache(maxsize=None)
def make_optimizer(learning_rate: float, schedule: str = "constant", total_steps: int = 1) -> optax.GradientTransformation:
    """Adam at ``learning_rate``, constant or cosine-decayed to 0 over ``total_steps``."""
    # apply_fn and tx are static TrainState fields, i.e. part of the pmap cache
    # key: reusing the same objects lets a second run in one process skip compiling.
    if schedule == "cosine":
        return optax.adam(optax.cosine_decay_schedule(learning_rate, total_steps))
    return optax.adam(learning_rate)


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


# --------------------------------------------------------------------------- run bookkeeping


class MetricsLog:
    """Appends JSON records to ``metrics.jsonl`` (process 0 only)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def __call__(self, **record) -> None:
        if not self.enabled:
            return
        record["time"] = time.time()
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drops records of steps after ``step`` (they are replayed) and a torn last line."""
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:  # half-written line of a killed run
                pass
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)


def check_writable_dir(workdir, flag: str = "--workdir") -> None:
    """Creates ``workdir`` and probes a write: a one-line ValueError instead of a deep OSError later."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {workdir} is not a writable directory ({type(e).__name__}: "
                         f"{e.strerror or e}); pass a directory you can create and write.") from None


def save_if_finite(ckpt, step: int, rstate, meta, metrics=None) -> None:
    """Checkpoints the (unreplicated) state unless it holds NaN/Inf: a bad state is never saved."""
    state = unreplicate(rstate)
    if not all_finite(state):
        raise DivergenceError(f"training diverged: the model state holds NaN/Inf at step {step}")
    ckpt.save(step, state, meta, metrics=metrics)


def check_finite_loss(loss: float, step: int) -> None:
    """Raises :class:`DivergenceError` for a NaN/Inf loss (checked at every metrics fetch)."""
    if not np.isfinite(loss):
        raise DivergenceError(f"training diverged: the training loss is {loss} at step {step}")


class StopRequested(RuntimeError):
    """SIGTERM arrived (e.g. a preemption notice); the last finished step was checkpointed."""


class StopSignal:
    """While active (a context manager), SIGTERM sets a flag instead of killing the process.

    The training loop polls :meth:`requested` between steps, saves a checkpoint
    and stops, so a preempted job resumes exactly where it stopped. In a
    multi-process run every process must stop after the same step (or the
    others would wait forever in the next collective), so the flag is combined
    over processes with a host all-gather, only at the loop's sync points.
    """

    def __init__(self):
        self._flag, self._previous = False, None

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self._flag = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def requested(self, sync_point: bool = True) -> bool:
        """Whether to stop now; between sync points a multi-process run never stops."""
        if jax.process_count() == 1:
            return self._flag
        if not sync_point:
            return False
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.int32(self._flag))))
