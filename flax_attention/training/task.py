"""The :class:`Task` interface of the one trainer.

A :class:`Task` bundles everything model- or data-specific (model + data +
loss + evaluation + inspection); the one training loop
(:mod:`flax_attention.training.loop`) only talks to this interface. To add a
model, write its builder, define a :class:`Task` (see
:func:`flax_attention.training.tasks.imdb_classifier`,
:mod:`~flax_attention.training.seq2seq` for the synthetic seq2seq tasks,
:mod:`~flax_attention.training.translate` for translation and
:mod:`~flax_attention.training.lm` for the language model) and list it in
:mod:`flax_attention.training.registry`. This module imports no task, so every
task module (and what they call, such as ``init_from``) can import it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

Configs = Mapping[str, Any]  # section name ("model", "data", "train") -> frozen dataclass


@dataclasses.dataclass(frozen=True)
class Task:
    """One ``--model`` choice.

    Attributes:
      name: the ``--model`` value.
      config_classes: ``{"model": cls, "data": cls}`` frozen dataclasses whose
        fields become command-line flags (a field name shared by two sections,
        e.g. ``vocab_size``, is one flag feeding both).
      prepare: ``(workdir, configs) -> Data``; caches side files in ``workdir``.
      load_extras: ``(workdir, configs) -> extras`` for prediction (no data read).
      build_model: ``(configs, extras) -> flax Module``; ``extras`` is ``None``
        when the flags are checked before any data is read (use the
        configured sizes then).
      init_inputs: ``(configs) -> tuple`` of dummy model inputs for ``init``.
      loss_and_metrics: see :mod:`flax_attention.training`.
      predict: ``(model, params, configs, extras, texts) -> list of dicts``
        (``prob``, ``label``, ``words``, ``weights``) or ``None``.
      selection_metric: eval metric that picks the best checkpoint.
      flag_defaults: ``{field: value}`` replacing flag defaults for this
        model (e.g. Adam(0.9, 0.98) with warm-up).
      make_loss: ``(configs) -> loss_and_metrics``, for a loss that depends
        on the config (then ``loss_and_metrics`` is ``None``).
      resumable: ``"section.field"`` names a resumed run may change (they do
        not alter what is trained, e.g. decoding settings).
      decode_eval: optional ``(model, params, configs, data, workdir, step,
        final) -> metrics`` run after the teacher-forced evaluation (decoding
        metrics such as BLEU; ``final`` marks the last evaluation).
      summary: ``(metrics) -> str``, the evaluation part of the epoch line.
      eval_name: what the evaluation counts (``reviews``, ``tokens``).
      init_params: optional ``(params, configs, data) -> (params, report)``
        applied once, before the first step of a fresh run (e.g. pretrained
        word vectors); ``report`` is logged.
      optimizer: optional ``(configs) -> wrap or None`` where ``wrap(tx, params)
        -> tx`` adapts the run's optimiser to the parameter tree: parameters
        that never change, per-layer learning rates. A run must resume with
        the settings it started with (the optimiser state's tree follows).
      added_fields: ``{"section.field": value}`` of fields added after
        workdirs were written, with the value older runs used.
      test_eval: optional ``(model, params, configs, data, workdir,
        selection, evaluate=...) -> metrics``, run once after training on the
        *selected* parameters (the best checkpoint by ``selection_metric``, or
        the average of the newest ``--average_checkpoints``; ``selection``
        says which: ``selected_step`` or ``averaged_steps``): the reported
        figure. ``evaluate(params, split)`` is the trainer's teacher-forced
        evaluation (per-weight means) of any object with ``eval_batches`` and
        ``num_eval_batches``, on the run's devices.
      preflight: optional ``(configs) -> None`` checking input files named by
        flags (e.g. ``--embeddings``) before anything is written; raises
        ValueError / FileNotFoundError.
      eval_metrics: optional ``(means) -> metrics`` derived from the
        evaluation's per-weight means and added to them (e.g. perplexities,
        which are not means of per-batch sums); the selection metric may be
        one of them.
    """

    name: str
    config_classes: Mapping[str, type]
    prepare: Callable[[Any, Configs], Any]  # duck-typed Data: the seq2seq tasks' data has no train split
    load_extras: Callable[[Any, Configs], Dict[str, Any]]
    build_model: Callable[[Configs, Dict[str, Any]], Any]
    init_inputs: Callable[[Configs], Tuple]
    loss_and_metrics: Optional[Callable]
    predict: Optional[Callable] = None
    selection_metric: str = "accuracy"
    flag_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    make_loss: Optional[Callable[[Configs], Callable]] = None
    resumable: Tuple[str, ...] = ()
    decode_eval: Optional[Callable] = None
    summary: Callable[[Mapping[str, float]], str] = lambda m: f"loss {m['loss']:.4f} acc {m['accuracy']:.4f}"
    eval_name: str = "test reviews"
    init_params: Optional[Callable] = None
    optimizer: Optional[Callable] = None
    added_fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    test_eval: Optional[Callable] = None
    preflight: Optional[Callable[[Configs], None]] = None
    eval_metrics: Optional[Callable[[Mapping[str, float]], Dict[str, float]]] = None

    def __post_init__(self):
        if (self.loss_and_metrics is None) == (self.make_loss is None):
            raise ValueError(f"task {self.name!r}: give exactly one of loss_and_metrics and make_loss.")

    def loss_fn(self, configs: Configs) -> Callable:
        if self.make_loss is not None:
            return self.make_loss(configs)
        assert self.loss_and_metrics is not None  # __post_init__
        return self.loss_and_metrics
