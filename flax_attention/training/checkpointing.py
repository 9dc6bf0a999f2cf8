"""Checkpoints and run-config bookkeeping for the training program (orbax).

Layout of a workdir::

    workdir/config.json        model name + every config field
    workdir/vocab.json         task-specific side files (e.g. the vocabulary)
    workdir/checkpoints/<step>/{state,meta}
    workdir/metrics.jsonl      one JSON object per logged event

Retention: the newest ``keep`` checkpoints plus the one with the best
``accuracy`` metric (epoch-end checkpoints carry metrics, mid-epoch ones do
not).

Crash safety: orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and
renames it when complete, so ``latest_step`` is always a complete checkpoint;
temporary folders left by a killed run are deleted when the next run opens
the workdir. ``config.json`` is replaced atomically, and ``train.py`` writes
it only after the requested run has been checked against the workdir (config
and checkpoint shapes), so a refused run changes nothing.

Multi-process runs: every process calls :meth:`Checkpointer.save` (orbax
coordinates them). A pmap run saves host copies, so only process 0 writes
the state; a ``--mesh`` run saves its sharded global arrays (each process
writes its shards). Either restores onto the other, or onto another mesh or
device count: :meth:`Checkpointer.restore` reads against a target tree whose
``jax.ShapeDtypeStruct`` leaves carry the shardings wanted (orbax reshards on
load). Side files are written by process 0 only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm


class IncompatibleWorkdirError(ValueError):
    """The workdir holds a run whose configuration differs from the requested one."""


def check_or_write_config(workdir, config: Dict[str, Any], resumable: Iterable[str] = (),
                          write: bool = True, added_fields: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Checks the requested config against ``workdir/config.json``, then (``write``) saves it.

    Args:
      workdir: run directory.
      config: JSON-able dict ``{section: {field: value}}`` plus ``"model_name"``.
      resumable: ``"section.field"`` names allowed to differ (e.g. the epoch count).
      write: also (over)write ``config.json`` (atomically) once the check passed;
        ``False`` only checks (e.g. before the checkpoint shapes are verified,
        or on processes other than 0).
      added_fields: see :func:`load_config`.

    Returns:
      The config to use (the requested one).

    Raises:
      IncompatibleWorkdirError: listing every differing field; nothing is overwritten.
    """
    path = Path(workdir) / "config.json"
    if path.exists():
        saved = _with_added_fields(json.loads(path.read_text()), added_fields)
        diffs = []
        for section in sorted(set(saved) | set(config)):
            a, b = saved.get(section), config.get(section)
            if isinstance(a, dict) and isinstance(b, dict):
                for k in sorted(set(a) | set(b)):
                    if f"{section}.{k}" not in resumable and a.get(k) != b.get(k):
                        diffs.append(f"{section}.{k}: saved {a.get(k)!r}, requested {b.get(k)!r}")
            elif a != b:
                diffs.append(f"{section}: saved {a!r}, requested {b!r}")
        if diffs:
            raise IncompatibleWorkdirError(
                f"{workdir} holds a run with a different configuration ({'; '.join(diffs)}). "
                "Use the saved settings to resume, or pass a fresh --workdir.")
    if write:  # persists allowed changes (e.g. more epochs) for the next resume
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
        os.replace(tmp, path)  # atomic: a crash never leaves half a config
    return config


def load_config(workdir, added_fields: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``workdir/config.json`` as a dict.

    Args:
      added_fields: ``{"section.field": value}`` for fields added to a config
        class after workdirs were written, with the value those older runs
        used; a saved config without the field gets it.
    """
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is --workdir a directory written by `train.py`?")
    return _with_added_fields(json.loads(path.read_text()), added_fields)


def _with_added_fields(saved: Dict[str, Any], added_fields: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    saved = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for name, value in (added_fields or {}).items():
        section, key = name.split(".", 1)
        if isinstance(saved.get(section), dict):
            saved[section].setdefault(key, value)
    return saved


def _path(keys) -> str:
    """``params/Embed_0/embedding``: one spelling for attribute, dict and index keys."""
    names = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in keys)
    return "/".join(str(n) for n in names)


class Checkpointer:
    """Thin wrapper over :class:`orbax.checkpoint.CheckpointManager`.

    Each checkpoint holds the (unreplicated) train state and a small JSON
    ``meta`` dict (epoch, step within the epoch, ...).
    """

    def __init__(self, workdir, keep: int = 3, read_only: bool = False):
        policy = ocm.AnyPreservationPolicy([
            ocm.LatestN(n=keep),
            ocm.BestN(get_metric_fn=lambda m: m["accuracy"], n=1, keep_checkpoints_without_metrics=False),
        ])
        # read_only only stops us creating the directory; orbax's own read_only
        # mode logs warnings on every open and nothing here saves anyway.
        # cleanup_tmp_directories: a run killed mid-save leaves a
        # ``<step>.orbax-checkpoint-tmp-*`` folder; it is never read (not a
        # finished step) and is deleted here.
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only,
                                               cleanup_tmp_directories=not read_only)
        directory = (Path(workdir) / "checkpoints").absolute()
        self.manager = ocp.CheckpointManager(
            directory, options=options, item_names=("state", "meta"),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def read_meta(self, step: int) -> Dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def best_step(self) -> Optional[int]:
        """Step of the retained checkpoint with the highest ``meta["accuracy"]`` (else the latest)."""
        scored = []
        for step in self.manager.all_steps():
            try:
                acc = self.read_meta(step).get("accuracy")
            except Exception:  # e.g. a step half-deleted by a killed run: not a candidate
                continue
            if acc is not None:
                scored.append((acc, step))
        return max(scored)[1] if scored else self.latest_step()

    def save(self, step: int, state, meta: Dict[str, Any], metrics: Optional[Dict[str, float]] = None,
             sharded: bool = False) -> None:
        """Starts saving ``state`` (copied to host now, written in the background).

        Training continues while orbax writes; the next ``save`` or
        :meth:`close` waits for it. A crash before it finishes leaves only a
        temporary folder, and the run resumes from the previous checkpoint.

        Args:
          sharded: ``state`` holds global (possibly multi-process) ``jax.Array``
            leaves: orbax copies each process's shards to host before this
            returns, then writes them.
        """
        # Either way a snapshot is on the host when save returns: later (donated) steps cannot change it.
        host_state = state if sharded else jax.device_get(state)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics=metrics, force=True)

    def wait(self) -> None:
        """Blocks until the last :meth:`save` is on disk."""
        self.manager.wait_until_finished()

    def check_compatible(self, step: int, abstract_state) -> None:
        """Raises :class:`IncompatibleWorkdirError` if the checkpoint's arrays do not fit the model."""
        try:
            saved = self.manager.item_metadata(step).state
        except Exception as e:
            raise IncompatibleWorkdirError(f"checkpoint {step} in {self.manager.directory} is unreadable "
                                           f"({type(e).__name__}); use a fresh --workdir.") from e
        want = {_path(k): tuple(getattr(v, "shape", None) or np.shape(v))
                for k, v in jax.tree_util.tree_leaves_with_path(abstract_state)}
        have = {_path(k): tuple(getattr(v, "shape", ()) or ()) for k, v in jax.tree_util.tree_leaves_with_path(saved)}
        diffs = [f"{k}: checkpoint {have.get(k, 'missing')}, model {want.get(k, 'missing')}"
                 for k in sorted(set(want) | set(have), key=lambda k: (not k.startswith("params"), k))
                 if have.get(k) != want.get(k)]
        if diffs:
            raise IncompatibleWorkdirError(
                f"checkpoint {step} in {self.manager.directory} does not fit the requested model "
                f"({len(diffs)} arrays differ, e.g. {'; '.join(diffs[:3])}). Use the settings it was "
                "trained with, or pass a fresh --workdir.")

    def restore(self, step: int, abstract_state) -> Tuple[Any, Dict[str, Any]]:
        """Restores ``(state, meta)`` at ``step`` into the structure of ``abstract_state``.

        Array leaves of ``abstract_state`` come back as host NumPy arrays
        (identical on every process; replicate them onto the devices);
        ``jax.ShapeDtypeStruct`` leaves with a ``sharding`` come back as global
        arrays sharded that way, whatever layout the checkpoint was written from.
        """
        self.check_compatible(step, abstract_state)
        target = jax.tree_util.tree_map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.device_get(x),
                                        abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def all_steps(self):
        return self.manager.all_steps()

    def close(self) -> None:
        """Waits for a pending save, then releases orbax's resources."""
        self.manager.wait_until_finished()
        self.manager.close()
