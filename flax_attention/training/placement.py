"""Where the training state and batches live: ``pmap`` replicas (the default) or a ``jit`` mesh.

The loop (:mod:`flax_attention.training.loop`) talks to one of two
placements through the same methods:

* :class:`PmapPlacement`: the state replicated on every device, each device
  one slice of the batch, the steps of :mod:`~flax_attention.training.steps`
  (``jax.pmap``, gradients ``psum``-ed); checkpoints hold host copies.
* :class:`~flax_attention.training.mesh.MeshPlacement` (``--mesh``):
  global arrays on a :class:`jax.sharding.Mesh`, parameters and optimizer
  state sharded by their logical axis names, ``jax.jit`` steps.

Both save the same checkpoint tree (the unreplicated ``TrainState``), so a
run started on one resumes on the other or on another device count.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Optional, Tuple

import jax

from flax_attention.training import distributed
from flax_attention.training.steps import (all_finite, create_train_state, make_eval_step, make_train_step,
                                           replicate, unreplicate)


class PmapPlacement:
    """Data parallelism with ``jax.pmap`` over every device of every process (the project's original path)."""

    def describe(self) -> str:
        return f"{jax.device_count()} device(s)"

    def check_batch(self, batch_size: int, flag: str) -> None:
        distributed.check_global_batch(batch_size, flag)

    def check_model(self, model) -> None:
        """Raises ValueError for a model this placement cannot train (every model fits pmap)."""

    def create_state(self, model, init_inputs: Tuple, config, rng, total_steps: int, wrap_optimizer=None):
        return replicate(create_train_state(model, init_inputs, config, rng, total_steps, wrap_optimizer))

    def restore_latest(self, ckpt, state, report=print) -> Tuple[Any, Dict[str, Any]]:
        """``(state, meta)`` of the newest intact checkpoint (see :meth:`Checkpointer.restore_latest`)."""
        restored, meta = ckpt.restore_latest(unreplicate(state), report=report)
        return replicate(restored), meta

    def host_template(self, state):
        """A restore target whose checkpoints come back as host arrays (e.g. for model selection)."""
        return unreplicate(state)

    def train_step(self, loss_fn: Callable) -> Callable:
        return make_train_step(loss_fn)

    def eval_step(self, loss_fn: Callable) -> Callable:
        return make_eval_step(loss_fn)

    def batch(self, batch):
        return distributed.local_batch(batch)

    def params(self, state):
        """The parameters as the decoding functions take them (one device's copy)."""
        return unreplicate(state).params

    def with_params(self, state, params):
        return replicate(unreplicate(state).replace(params=params))

    def step(self, state) -> int:
        return int(unreplicate(state).step)

    # Checkpoints hold host copies of one replica (orbax then writes NumPy arrays).
    sharded_checkpoints = False

    def saveable(self, state):
        return unreplicate(state)

    def finite(self, saveable) -> bool:
        return all_finite(saveable)

    def context(self):
        return contextlib.nullcontext()


def make_placement(mesh: Optional[str]):
    """:class:`PmapPlacement` for ``None``/``""``, else a mesh placement for the ``--mesh`` text."""
    if not mesh:
        return PmapPlacement()
    from flax_attention.training.mesh import MeshPlacement, parse_mesh, parse_seq_method

    return MeshPlacement(parse_mesh(mesh), seq_method=parse_seq_method(mesh))
