"""The reported model: the checkpoint chosen on validation, or the average of the newest checkpoints.

After training, a task with a final test (``Task.test_eval``, e.g. translation)
is evaluated on the parameters that model selection picked, never simply on
the last step's:

* default: the retained checkpoint with the best selection metric on the
  validation split (what ``train.py translate`` loads too);
* ``--average_checkpoints K``: the element-wise mean of the parameters of the
  newest ``K`` checkpoints (checkpoint averaging, Vaswani et al. 2017 §6.1;
  ``fairseq``'s ``average_checkpoints.py``), accumulated in float64 and cast
  back to each parameter's dtype.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import jax
import numpy as np


def average_params(ckpt, steps, template_state):
    """Mean parameters of the checkpoints ``steps`` (restored into ``template_state``'s structure)."""
    total, params = None, None
    for step in steps:
        params = ckpt.restore(step, template_state)[0].params
        as64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
        total = as64 if total is None else jax.tree_util.tree_map(np.add, total, as64)
    return jax.tree_util.tree_map(lambda t, p: (t / len(steps)).astype(np.asarray(p).dtype), total, params)


def select_params(ckpt, template_state, average: int) -> Tuple[Any, Dict[str, Any]]:
    """``(params, selection)``: ``selection`` is ``{"selected_step": s}`` or ``{"averaged_steps": [...]}``."""
    ckpt.wait()
    steps = sorted(ckpt.all_steps())
    if average >= 1:
        if len(steps) < average:
            raise ValueError(f"--average_checkpoints {average}: only {len(steps)} checkpoints are kept "
                             f"({steps}); lower K or raise --keep_checkpoints.")
        chosen = steps[-average:]
        return average_params(ckpt, chosen, template_state), {"averaged_steps": chosen}
    step = ckpt.best_step()
    return ckpt.restore(step, template_state)[0].params, {"selected_step": int(step)}


def final_test(task, configs, model, ckpt, template_state, data, workdir, log, evaluate=None) -> Dict[str, Any]:
    """Runs ``task.test_eval`` on the selected parameters and logs the ``test`` event.

    ``evaluate(params, split)``: the trainer's teacher-forced evaluation of
    ``params`` on ``split`` (``eval_batches``/``num_eval_batches``), passed on.
    """
    params, selection = select_params(ckpt, template_state, configs["train"].average_checkpoints)
    out = {**selection, **task.test_eval(model, params, configs, data, workdir, selection, evaluate=evaluate)}
    log(event="test", step=int(template_state.step), **out)
    return out
