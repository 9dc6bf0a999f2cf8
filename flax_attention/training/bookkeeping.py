"""Run bookkeeping of the training loop: metrics log + TensorBoard, workdir checks, divergence and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from flax_attention.training import distributed
from flax_attention.data import atomic


def maybe_initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> bool:
    """Joins a multi-process run if flags or ``JAX_COORDINATOR_ADDRESS`` etc. ask for one.

    See :mod:`flax_attention.training.distributed`; single-process runs never touch
    :mod:`jax.distributed`.
    """
    return distributed.initialize(distributed.resolve(coordinator_address, num_processes, process_id))


class DivergenceError(RuntimeError):
    """The training loss became NaN/Inf; the last finite checkpoint is kept."""


# --------------------------------------------------------------------------- run bookkeeping


class MetricsLog:
    """Appends JSON records to ``metrics.jsonl`` and scalars to TensorBoard (process 0 only).

    Every numeric field of a record with a ``step`` becomes the TensorBoard
    scalar ``<event>/<field>`` (e.g. ``train/loss``, ``eval/bleu``) in
    ``WORKDIR/tensorboard`` (tensorboardX: no TensorFlow needed), so
    ``tensorboard --logdir checkpoints`` shows every run's curves.
    """

    def __init__(self, path: Path, enabled: bool = True, tensorboard_dir: Optional[Path] = None):
        self.path, self.enabled, self._tb_dir = path, enabled, tensorboard_dir
        self._tb: Optional[Any] = None  # a tensorboardX SummaryWriter, made by the first record
        self._purge_step: Optional[int] = None

    def __call__(self, **record) -> None:
        if not self.enabled:
            return
        record["time"] = time.time()
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb_dir is not None and "step" in record:
            if self._tb is None:
                from tensorboardX import SummaryWriter  # lazy: only runs that log need it
                # purge_step: TensorBoard hides events of a killed run past the resume step.
                self._tb = SummaryWriter(str(self._tb_dir), flush_secs=30, purge_step=self._purge_step)
            event = record.get("event", "metrics")
            for k, v in record.items():
                if k not in ("step", "time", "event", "epoch") and isinstance(v, (int, float)) and np.isfinite(v):
                    self._tb.add_scalar(f"{event}/{k}", float(v), int(record["step"]), walltime=record["time"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def truncate_after(self, step: int) -> None:
        """On resume: drops records of steps after ``step`` (they are replayed) and a torn last line."""
        self._purge_step = step + 1 if step else None
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:  # half-written line of a killed run
                pass
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))


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


def save_if_finite(ckpt, step: int, rstate, meta, metrics=None, placement=None) -> None:
    """Checkpoints the (unreplicated) state unless it holds NaN/Inf: a bad state is never saved.

    ``placement``: where ``rstate`` lives (default: pmap replicas); see
    :mod:`flax_attention.training.placement`.
    """
    if placement is None:
        from flax_attention.training.placement import PmapPlacement
        placement = PmapPlacement()
    state = placement.saveable(rstate)
    if not placement.finite(state):
        raise DivergenceError(f"training diverged: the model state holds NaN/Inf at step {step}")
    ckpt.save(step, state, meta, metrics=metrics, sharded=placement.sharded_checkpoints)


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
