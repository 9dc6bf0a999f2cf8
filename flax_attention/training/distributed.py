"""Multi-process (multi-host) data-parallel training: setup and per-process batches.

One Python process runs per host (or per GPU group); together they form one
``jax.pmap`` over *all* global devices, so ``psum`` in the train step reduces
over every device of every process. Setup comes from flags or the usual
environment variables (flags win):

=====================  ==========================  =====================
flag                   environment variable        meaning
=====================  ==========================  =====================
--coordinator_address  JAX_COORDINATOR_ADDRESS     ``host:port`` of process 0
--num_processes        JAX_NUM_PROCESSES           total process count
--process_id           JAX_PROCESS_ID              this process, ``0..n-1``
=====================  ==========================  =====================

Data sharding (``process_batch``): every process computes the *same* global
batch (the shuffle order is a pure function of seed and epoch) and keeps only
its contiguous block of rows, ``[p * B / P, (p + 1) * B / P)``, which it splits
over its local devices. Process ``p``'s local device ``j`` is pmap axis index
``p * L + j`` (JAX orders global devices by process), so device ``k`` sees
exactly the rows it would see in a single process with ``P * L`` devices:
a multi-process run reproduces the single-process run, dropout included
(dropout keys are folded with the axis index).

On CPU, cross-process collectives use Gloo (JAX 0.10's default
``jax_cpu_collectives_implementation``); on GPU NCCL, on TPU ICI/DCN.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, Mapping, Optional

import numpy as np

ENV_ADDRESS, ENV_NUM, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
_ADDRESS = re.compile(r"^\[?[\w.\-:]+\]?:\d{1,5}$")


class DistributedSetupError(ValueError):
    """Inconsistent multi-process settings, or the coordinator cannot be reached."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """A validated multi-process setup.

    Attributes:
      coordinator_address: ``host:port`` where process 0 listens.
      num_processes: ``P`` > 1.
      process_id: this process, ``0 <= process_id < P``.
    """

    coordinator_address: str
    num_processes: int
    process_id: int


def _int(value, name: str) -> Optional[int]:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedSetupError(f"{name} must be an integer, got {value!r}.") from None


def resolve(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None, environ: Mapping[str, str] = os.environ
            ) -> Optional[DistributedConfig]:
    """Merges flags (first) and environment variables; ``None`` for a single-process run.

    Raises:
      DistributedSetupError: a multi-process run with a missing or invalid setting.
    """
    addr = coordinator_address or environ.get(ENV_ADDRESS) or None
    n = _int(num_processes, "--num_processes")
    n = n if n is not None else _int(environ.get(ENV_NUM), ENV_NUM)
    pid = _int(process_id, "--process_id")
    pid = pid if pid is not None else _int(environ.get(ENV_ID), ENV_ID)
    if n is None or n == 1:
        if pid not in (None, 0):
            raise DistributedSetupError(f"process id {pid} given for a single-process run; "
                                        "set --num_processes (or JAX_NUM_PROCESSES) to the total process count.")
        return None
    if n < 1:
        raise DistributedSetupError(f"--num_processes must be >= 1, got {n}.")
    if addr is None:
        raise DistributedSetupError(f"{n} processes need a coordinator: pass --coordinator_address HOST:PORT "
                                    f"(or set {ENV_ADDRESS}) with process 0's host and a free port.")
    if not _ADDRESS.match(addr):
        raise DistributedSetupError(f"--coordinator_address must look like HOST:PORT, got {addr!r}.")
    if pid is None or not 0 <= pid < n:
        raise DistributedSetupError(f"--process_id must be in 0..{n - 1} for {n} processes, got {pid}; "
                                    f"give each process its own id (or set {ENV_ID}).")
    return DistributedConfig(addr, n, pid)


def initialize(config: Optional[DistributedConfig], timeout_s: int = 300) -> bool:
    """Connects this process to the others (no-op for ``None``); call before any JAX computation.

    Returns:
      Whether :func:`jax.distributed.initialize` was called.
    """
    if config is None:
        return False
    import jax

    try:
        jax.distributed.initialize(coordinator_address=config.coordinator_address,
                                   num_processes=config.num_processes, process_id=config.process_id,
                                   initialization_timeout=timeout_s)
    except Exception as e:  # connection refused / timeout surface as XlaRuntimeError deep in jaxlib
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DistributedSetupError(
            f"process {config.process_id}/{config.num_processes} could not join the coordinator at "
            f"{config.coordinator_address} ({first}). Start all {config.num_processes} processes with the "
            "same --coordinator_address (process 0's host and a free port) within the timeout.") from e
    return True


def process_index() -> int:
    import jax
    return jax.process_index()


def process_count() -> int:
    import jax
    return jax.process_count()


def is_primary() -> bool:
    """Process 0 writes the side files (config, vocabulary, metrics) and prints progress."""
    return process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches ``name`` (no-op in a single process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def check_global_batch(batch_size: int, flag: str = "--batch_size") -> None:
    """``batch_size`` must split evenly over all devices of all processes."""
    import jax

    n, p = jax.device_count(), jax.process_count()
    if batch_size % n:
        where = f"{n} devices ({p} processes x {jax.local_device_count()} local)" if p > 1 else f"{n} devices"
        raise ValueError(f"{flag} {batch_size} is not divisible by the {where}; use a multiple of {n}.")


def process_batch(batch: Dict[str, np.ndarray], process_id: int, num_processes: int,
                  local_devices: int) -> Dict[str, np.ndarray]:
    """This process's rows of a global batch, split over its local devices.

    Args:
      batch: global batch, every value ``[B, ...]``; ``B`` divisible by
        ``num_processes * local_devices``.
      process_id: ``p``.
      num_processes: ``P``.
      local_devices: ``L``.

    Returns:
      Dict of ``[L, B / (P * L), ...]`` arrays: rows ``p * B / P ... (p + 1) * B / P - 1``.
    """
    b = next(iter(batch.values())).shape[0]
    if b % (num_processes * local_devices):
        raise ValueError(f"global batch {b} is not divisible by {num_processes} processes x {local_devices} "
                         f"devices; choose --batch_size as a multiple of {num_processes * local_devices}.")
    per = b // num_processes
    lo = process_id * per
    return {k: v[lo: lo + per].reshape(local_devices, per // local_devices, *v.shape[1:])
            for k, v in batch.items()}


def local_batch(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """:func:`process_batch` for the running process and its local devices."""
    import jax
    return process_batch(batch, jax.process_index(), jax.process_count(), jax.local_device_count())
