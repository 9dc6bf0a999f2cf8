"""A workdir's saved configuration and best checkpoint, for a known task.

Below :mod:`~flax_attention.training.registry`: the inspection commands
(:mod:`~flax_attention.training.inspector`, which looks the task up by the
workdir's model name), ``train.py generate`` and ``--init_from`` (which know
their task) all restore through here.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

from flax_attention.training.checkpointing import Checkpointer, load_config
from flax_attention.training.config import TrainConfig, configs_from_json
from flax_attention.training.loop import create_train_state
from flax_attention.training.task import Configs, Task


def task_configs(workdir, task: Task) -> Configs:
    """The workdir's ``config.json`` as ``task``'s config sections plus ``train`` (added fields filled in)."""
    saved = load_config(workdir, {**TrainConfig.added_fields(), **task.added_fields})
    return configs_from_json({**task.config_classes, "train": TrainConfig}, saved)


def restore_best(workdir, task: Task, configs: Configs) -> Tuple[Any, Any, Dict[str, Any], int]:
    """``(model, params, extras, step)`` of the workdir's best checkpoint.

    Raises:
      FileNotFoundError: the workdir has no checkpoint yet.
    """
    extras = task.load_extras(workdir, configs)
    model, state = create_train_state(task, configs, extras)
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        step = ckpt.best_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first.")
        state, _ = ckpt.restore(step, state)
    finally:
        ckpt.close()
    return model, state.params, extras, step
