"""Workdirs of the seq2seq trainer: the run's config as JSON, and loading a trained model.

A workdir written by ``train.py --model seq2seq`` holds ``config.json``
(``{"model_name": "seq2seq", "task": ..., "model": ..., "train": ...}``) and
orbax checkpoints under ``checkpoints/`` (see
:class:`~flax_attention.checkpointing.Checkpointer`), one per evaluation, each
scored by its held-out exact match.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import jax.numpy as jnp

MODEL_NAME = "seq2seq"
# Settings that only change what is evaluated or how, never the trained
# parameters: a resumed run may change them.
RESUMABLE = ("eval_every", "eval_examples", "length_eval_per_length", "decode_batch", "beam_size", "alpha")
_DTYPE_FIELDS = ("dtype", "param_dtype")


def run_config_json(model_config, task, train) -> Dict[str, Any]:
    """JSON-able ``{model_name, task, model, train}`` (dtypes by name)."""
    model = {k: (jnp.dtype(v).name if k in _DTYPE_FIELDS else v) for k, v in dataclasses.asdict(model_config).items()}
    return {"model_name": MODEL_NAME, "task": dataclasses.asdict(task), "model": model,
            "train": dataclasses.asdict(train)}


def configs_from_json(saved: Dict[str, Any]) -> Tuple[Any, Any, Any]:
    """Inverse of :func:`run_config_json`: ``(TransformerConfig, TaskConfig, Seq2SeqTrainConfig)``."""
    from flax_attention.data.tasks import TaskConfig
    from flax_attention.data.translate import TranslateConfig
    from flax_attention.layers import TransformerConfig
    from flax_attention.seq2seq_train import Seq2SeqTrainConfig

    if saved.get("model_name") != MODEL_NAME:
        raise ValueError(f"the workdir holds a {saved.get('model_name')!r} run, not a seq2seq one.")
    model = {k: (getattr(jnp, v) if k in _DTYPE_FIELDS else v) for k, v in saved["model"].items()}
    task_cls = TranslateConfig if saved["task"].get("name") == "translate" else TaskConfig
    return TransformerConfig(**model), task_cls(**saved["task"]), Seq2SeqTrainConfig(**saved["train"])


def load_trained(workdir):
    """``(model, params, task, train_config, step)`` from a seq2seq workdir's best checkpoint.

    "Best" is the highest held-out exact match among the kept checkpoints.

    Raises:
      FileNotFoundError: no ``config.json`` or no checkpoint in ``workdir``.
    """
    from flax_attention.checkpointing import Checkpointer, load_config
    from flax_attention.seq2seq_train import create_train_state

    model_config, task, train = configs_from_json(load_config(workdir))
    model, state = create_train_state(model_config, task, train)
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        step = ckpt.best_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first "
                                    f"(train.py --model seq2seq --workdir {workdir}).")
        state, _ = ckpt.restore(step, state)
    finally:
        ckpt.close()
    return model, state.params, task, train, step
