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
the workdir. A finished checkpoint damaged later (a truncated or missing
file) is moved to ``workdir/checkpoints.damaged/<step>`` -- kept, never
deleted -- and the run resumes from the newest intact one, saying so
(:meth:`Checkpointer.restore_latest`). ``config.json`` is replaced atomically, and ``train.py`` writes
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
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import jax
import numpy as np
from flax_attention.data import atomic
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm


class IncompatibleWorkdirError(ValueError):
    """The workdir holds a run whose configuration differs from the requested one."""


class DamagedCheckpointError(IncompatibleWorkdirError):
    """A finished checkpoint cannot be read back (a file truncated, missing or corrupt)."""


def _is_closed_loop_callback(unraisable) -> bool:
    """tensorstore's reply to a read that orbax's ``asyncio.run`` stopped waiting for.

    When one read of a checkpoint fails, orbax's event loop raises that error
    and closes; the other reads still in flight then complete into the closed
    loop (``call_soon_threadsafe``), and each becomes an unraisable
    ``RuntimeError('Event loop is closed')`` printed as a traceback -- pages of
    them bury the one real error. They carry no information.
    """
    exc, tb = unraisable.exc_value, unraisable.exc_traceback
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
        return False
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


class _QuietHook:
    """An unraisable-exception hook that drops :func:`_is_closed_loop_callback` errors and passes on the rest."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable):
        if not _is_closed_loop_callback(unraisable):
            self.previous(unraisable)


def quiet_closed_loop_callbacks() -> None:
    """Installs (once) a :class:`_QuietHook` in front of the current ``sys.unraisablehook``."""
    if not isinstance(sys.unraisablehook, _QuietHook):
        sys.unraisablehook = _QuietHook(sys.unraisablehook)


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
        saved = _with_added_fields(read_config_file(path), added_fields)
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
        atomic.write_text(path, json.dumps(config, indent=2, sort_keys=True))
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
    return _with_added_fields(read_config_file(path), added_fields)


def read_config_file(path) -> Dict[str, Any]:
    """A ``config.json`` as a dict, or a ValueError naming the file (it is never rewritten here)."""
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); it records the settings the run was "
                         "trained with: restore it from a backup (or write it by hand), or use a fresh "
                         "--workdir.") from None
    if not isinstance(saved, dict) or not all(isinstance(v, (dict, str)) for v in saved.values()):
        raise ValueError(f"{path} is not a train.py config (a JSON object of sections); restore it, or use a "
                         "fresh --workdir.")
    return saved


def _with_added_fields(saved: Dict[str, Any], added_fields: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    saved = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for name, value in (added_fields or {}).items():
        section, key = name.split(".", 1)
        if isinstance(saved.get(section), dict):
            saved[section].setdefault(key, value)
    return saved


def _first_line(e: BaseException) -> str:
    text = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


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
        quiet_closed_loop_callbacks()
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
            raise DamagedCheckpointError(f"checkpoint {step} in {self.manager.directory} is unreadable "
                                         f"({_first_line(e)})") from None
        want = {_path(k): tuple(getattr(v, "shape", None) or np.shape(v))
                for k, v in jax.tree_util.tree_leaves_with_path(abstract_state)}
        have = {_path(k): tuple(getattr(v, "shape", ()) or ()) for k, v in jax.tree_util.tree_leaves_with_path(saved)}
        if not have:  # no array recorded at all: its index is lost, not a different model
            raise DamagedCheckpointError(f"checkpoint {step} in {self.manager.directory} lists no arrays "
                                         "(its metadata is missing or empty)")
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
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                     meta=ocp.args.JsonRestore()))
        except Exception as e:  # the shapes fit, so a read failed: a damaged file
            raise DamagedCheckpointError(f"checkpoint {step} in {self.manager.directory} is damaged "
                                         f"({_first_line(e)})") from None
        if not isinstance(out.meta, dict):
            raise DamagedCheckpointError(f"checkpoint {step} in {self.manager.directory} has no readable meta")
        return out.state, out.meta

    def restore_latest(self, abstract_state, report=print) -> Tuple[Any, Dict[str, Any]]:
        """Restores the newest checkpoint that reads back intact.

        A damaged newer one is moved to ``<workdir>/checkpoints.damaged/<step>``
        (kept for inspection; a resumed run would otherwise write over its
        step) and ``report`` says so. A checkpoint that reads fine but does not
        fit the model is not damaged: :class:`IncompatibleWorkdirError`.

        Raises:
          DamagedCheckpointError: no checkpoint is intact (all were moved aside).
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.restore(step, abstract_state)
            except DamagedCheckpointError as e:
                aside = self.set_aside(step)
                report(f"warning: {e}; moved it to {aside} and fell back to the previous checkpoint.")
        raise DamagedCheckpointError(f"no intact checkpoint is left in {self.manager.directory} (the damaged "
                                     "ones are in checkpoints.damaged/); use a fresh --workdir.")

    def set_aside(self, step: int) -> Path:
        """Moves a step's folder to ``checkpoints.damaged/`` (process 0) and makes orbax forget it."""
        src = Path(self.manager.directory) / str(step)
        dst = src.parent.with_name(src.parent.name + ".damaged") / str(step)
        if jax.process_index() == 0 and src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            n = 0
            while dst.exists():  # damaged twice at the same step: keep both
                n += 1
                dst = dst.with_name(f"{step}.{n}")
            shutil.move(str(src), str(dst))
        self.manager.reload()
        return dst

    def all_steps(self):
        return self.manager.all_steps()

    def close(self) -> None:
        """Waits for a pending save, then releases orbax's resources."""
        self.manager.wait_until_finished()
        self.manager.close()
