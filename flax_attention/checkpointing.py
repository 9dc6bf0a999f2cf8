"""Checkpoints and run-config bookkeeping for the training program (orbax).

Layout of a workdir::

    workdir/config.json        model name + every config field
    workdir/vocab.json         task-specific side files (e.g. the vocabulary)
    workdir/checkpoints/<step>/{state,meta}
    workdir/metrics.jsonl      one JSON object per logged event

Retention: the newest ``keep`` checkpoints plus the one with the best
``accuracy`` metric (epoch-end checkpoints carry metrics, mid-epoch ones do
not). Orbax writes a step directory atomically, so ``latest_step`` is always
a complete checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm


class IncompatibleWorkdirError(ValueError):
    """The workdir holds a run whose configuration differs from the requested one."""


def check_or_write_config(workdir, config: Dict[str, Any], resumable: Iterable[str] = ()) -> Dict[str, Any]:
    """Writes ``workdir/config.json``, or checks the requested config against it.

    Args:
      workdir: run directory.
      config: JSON-able dict ``{section: {field: value}}`` plus ``"model_name"``.
      resumable: ``"section.field"`` names allowed to differ (e.g. the epoch count).

    Returns:
      The config to use (the requested one).

    Raises:
      IncompatibleWorkdirError: listing every differing field; nothing is overwritten.
    """
    path = Path(workdir) / "config.json"
    if path.exists():
        saved = json.loads(path.read_text())
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
        # Persist allowed changes (e.g. more epochs) for the next resume.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return config


def load_config(workdir) -> Dict[str, Any]:
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is --workdir a directory written by `train.py`?")
    return json.loads(path.read_text())


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
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only)
        directory = (Path(workdir) / "checkpoints").absolute()
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def read_meta(self, step: int) -> Dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def best_step(self) -> Optional[int]:
        """Step of the retained checkpoint with the highest ``meta["accuracy"]`` (else the latest)."""
        scored = []
        for step in self.manager.all_steps():
            acc = self.read_meta(step).get("accuracy")
            if acc is not None:
                scored.append((acc, step))
        return max(scored)[1] if scored else self.latest_step()

    def save(self, step: int, state, meta: Dict[str, Any], metrics: Optional[Dict[str, float]] = None) -> None:
        """Saves (blocking until written, so a crash right after still resumes here)."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics=metrics, force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state) -> Tuple[Any, Dict[str, Any]]:
        """Restores ``(state, meta)`` at ``step`` into the structure of ``abstract_state``."""
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def all_steps(self):
        return self.manager.all_steps()

    def close(self) -> None:
        self.manager.close()
