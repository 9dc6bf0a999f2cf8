"""The training program of flax_attention: one trainer for every model family.

Layout (imports run one way: ``train.py`` -> this package -> embed/data/models ->
the library; nothing in the package imports from here):

* :mod:`.config`: :class:`TrainConfig` and the dataclass-to-flags system;
* :mod:`.steps`: ``TrainState``, the optax optimiser and schedules, pmapped
  ``train_step``/``eval_step``, metric sums;
* :mod:`.loop`: ``train_and_evaluate`` (resume, evaluation, checkpoints,
  SIGTERM, divergence stop, metrics.jsonl + TensorBoard);
* :mod:`.task`: the :class:`Task` interface every model family implements;
  :mod:`.tasks` the IMDB classifiers (``--init_from`` in :mod:`.init_from`);
  :mod:`.seq2seq` (losses in :mod:`.seq2seq_loss`) the synthetic seq2seq tasks;
  :mod:`.translate` translation (BLEU in :mod:`.bleu`); :mod:`.lm` the language
  model and ``train.py generate``; :mod:`.registry` the ``--model`` choices;
* :mod:`.placement`: where state and batches live, ``pmap`` replicas (default)
  or, with ``--mesh``, :mod:`.mesh`'s ``jax.jit`` + ``NamedSharding`` mesh;
* :mod:`.checkpointing`, :mod:`.distributed`, :mod:`.bookkeeping`: orbax
  checkpoints, multi-process helpers, run bookkeeping;
* :mod:`.selection`: the reported model (best or averaged checkpoints);
* :mod:`.restore`: a workdir's configuration and best checkpoint for a known task;
  :mod:`.inspector`: ``predict`` / ``translate`` / ``visualize`` on a workdir
  (pictures from :mod:`.heatmaps` and :mod:`.review_html`); :mod:`.ensemble`:
  ``train.py ensemble``, the mean probability of several classifier workdirs.
"""

from flax_attention.training.bookkeeping import (DivergenceError, MetricsLog, StopRequested, StopSignal,
                                                 check_finite_loss, check_writable_dir,
                                                 maybe_initialize_distributed, save_if_finite)
from flax_attention.training.config import TrainConfig
from flax_attention.training.steps import (AXIS, MetricAccumulator, TrainState, all_finite, create_train_state,
                                           learning_rate_schedule, make_eval_step, make_optimizer, make_train_step,
                                           replicate, summarize, unreplicate)

__all__ = ["AXIS", "DivergenceError", "MetricAccumulator", "MetricsLog", "StopRequested", "StopSignal", "TrainConfig",
           "TrainState", "all_finite", "check_finite_loss", "check_writable_dir", "create_train_state",
           "learning_rate_schedule", "make_eval_step", "make_optimizer", "make_train_step",
           "maybe_initialize_distributed", "replicate", "save_if_finite", "summarize", "unreplicate"]
