"""Run configuration: the model-independent :class:`TrainConfig` and the flag system.

Every section of a run (``model``, ``data``, ``train``, plus e.g. ``decode`` for
seq2seq tasks) is a frozen dataclass; each field becomes one ``--flag`` whose
help text is the field's line in the class docstring's ``Attributes:``
section. A task may change the *defaults* of TrainConfig fields (a translation
model wants Adam(0.9, 0.98) with warm-up, a classifier a cosine decay), never
their meaning. ``config.json`` in the workdir stores every section, so a resumed
run is checked field by field.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from typing import Any, Dict, Mapping, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping settings (model-independent).

    Attributes:
      learning_rate: Adam learning rate (the peak of the schedule).
      lr_schedule: ``cosine`` decays the rate to zero over the whole run
        (``num_epochs`` x steps per epoch; Loshchilov & Hutter 2017, no
        restarts); ``constant`` keeps it fixed; ``rsqrt`` is the Transformer
        paper's Eq. 3 rescaled to peak at ``learning_rate`` after
        ``warmup_steps`` (linear warm-up, then ``1/sqrt(step)`` decay).
      warmup_steps: linear warm-up steps (``rsqrt`` needs >= 1; cosine/constant
        ramp up over them too when > 0).
      cooldown_fraction: the last fraction of all steps decays the rate
        linearly to 0 (0 = off); lets a short run settle, instead of ending
        at half its peak rate.
      adam_b2: Adam's second-moment decay (the Transformer paper: 0.98).
      adam_eps: Adam's epsilon (the Transformer paper: 1e-9).
      clip_norm: clip gradients to this global norm (0 = no clipping).
      batch_size: global batch size, split evenly over local devices.
      num_epochs: passes over the training split.
      seed: seeds initialisation, dropout and the shuffle order.
      checkpoint_every: also checkpoint every N steps (0 = only at epoch ends).
      keep_checkpoints: newest checkpoints kept (the best one is kept as well).
      log_every: fetch metrics / update the progress bar every N steps.
      eval_batch_size: global evaluation batch (0 = batch_size).
      average_checkpoints: tasks with a final test (translation): report the
        mean parameters of the newest K checkpoints instead of the best one
        on validation (0 = off: the best one; needs --keep_checkpoints >= K).
    """

    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    cooldown_fraction: float = 0.0
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    clip_norm: float = 0.0
    batch_size: int = 256
    num_epochs: int = 3
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_batch_size: int = 0
    average_checkpoints: int = 0

    # Fields that may change when resuming a workdir (they do not alter what
    # has been trained so far).
    RESUMABLE_CHANGES = ("num_epochs", "checkpoint_every", "keep_checkpoints", "log_every", "eval_batch_size",
                         "average_checkpoints")
    SCHEDULES = ("cosine", "constant", "rsqrt")
    # Fields added after workdirs were written -> the value those older runs used.
    ADDED_FIELDS = {"lr_schedule": "constant", "warmup_steps": 0, "cooldown_fraction": 0.0, "adam_b2": 0.999,
                    "adam_eps": 1e-8, "clip_norm": 0.0, "average_checkpoints": 0}

    def __post_init__(self):
        for name in ("batch_size", "num_epochs", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0 (it seeds NumPy's shuffles), got {self.seed}.")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}.")
        if self.lr_schedule not in self.SCHEDULES:
            raise ValueError(f"--lr_schedule must be one of {', '.join(self.SCHEDULES)}; got {self.lr_schedule!r}.")
        if self.lr_schedule == "rsqrt" and self.warmup_steps < 1:
            raise ValueError("--lr_schedule rsqrt needs --warmup_steps >= 1 (its peak step).")
        if self.checkpoint_every < 0 or self.eval_batch_size < 0 or self.warmup_steps < 0 or self.clip_norm < 0:
            raise ValueError("--checkpoint_every, --eval_batch_size, --warmup_steps and --clip_norm must be >= 0.")
        if not 0.0 <= self.cooldown_fraction <= 1.0:
            raise ValueError(f"--cooldown_fraction must be in [0, 1], got {self.cooldown_fraction}.")
        if not 0 <= self.average_checkpoints <= self.keep_checkpoints:
            raise ValueError(f"--average_checkpoints {self.average_checkpoints} needs 0 <= K <= --keep_checkpoints "
                             f"({self.keep_checkpoints}): only kept checkpoints can be averaged; raise "
                             "--keep_checkpoints or lower K.")
        if self.average_checkpoints > self.num_epochs and not self.checkpoint_every:
            raise ValueError(f"--average_checkpoints {self.average_checkpoints} exceeds the {self.num_epochs} "
                             "checkpoints the run writes (one per epoch); lower it or pass --checkpoint_every.")
        if not (0.0 <= self.adam_b2 < 1.0 and self.adam_eps > 0):
            raise ValueError(f"need 0 <= --adam_b2 < 1 and --adam_eps > 0, got {self.adam_b2}, {self.adam_eps}.")

    @classmethod
    def added_fields(cls) -> Dict[str, Any]:
        """:attr:`ADDED_FIELDS` as ``{"train.field": value}`` (see :func:`~flax_attention.training.checkpointing.load_config`)."""
        return {f"train.{k}": v for k, v in cls.ADDED_FIELDS.items()}

    def resumable_changes(self) -> Tuple[str, ...]:
        """Fields a resumed run may change.

        The cosine schedule is laid out over ``num_epochs``, so there it is fixed.
        ``constant`` and ``rsqrt`` do not depend on the run's length except
        through the cooldown, so their ``num_epochs`` may change as long as no
        cooldown has begun (:meth:`check_epochs_change`, once the step is known).
        """
        if self.lr_schedule != "cosine":
            return self.RESUMABLE_CHANGES
        return tuple(k for k in self.RESUMABLE_CHANGES if k != "num_epochs")

    def cooldown_start(self, total_steps: int) -> int:
        """The first update count of the cooldown (``total_steps`` when there is none)."""
        return total_steps - int(round(self.cooldown_fraction * total_steps))

    def check_epochs_change(self, saved_epochs: int, step: int, steps_per_epoch: int) -> None:
        """Refuses a resumed ``num_epochs`` that would give the updates already made another rate.

        Resuming at ``step`` with a new length is the same as having trained with
        that length from the start iff neither the old nor the new cooldown has
        begun by then (``rsqrt``/``constant`` do not otherwise depend on it).

        Raises:
          ValueError: naming both lengths, the step and the fix.
        """
        if saved_epochs == self.num_epochs or (self.lr_schedule != "cosine" and self.cooldown_fraction == 0):
            return
        starts = [self.cooldown_start(e * steps_per_epoch) for e in (saved_epochs, self.num_epochs)]
        if self.lr_schedule == "cosine" or step > min(starts):
            raise ValueError(
                f"--num_epochs {self.num_epochs} differs from the run's {saved_epochs}, and at step {step} its "
                f"learning-rate schedule ({self.lr_schedule}, cooldown_fraction {self.cooldown_fraction}) would no "
                f"longer be the one a {self.num_epochs}-epoch run had (cooldown from step {min(starts)}); "
                f"resume with --num_epochs {saved_epochs}, or train in a new --workdir. Nothing was changed.")


# --------------------------------------------------------------------------- flags


def field_docs(cls) -> Dict[str, str]:
    """``name: text`` entries of a dataclass docstring's ``Attributes:`` section."""
    docs, current = {}, None
    for line in (cls.__doc__ or "").splitlines():
        m = re.match(r"\s+(\w+): (.*)", line)
        if m:
            current = m.group(1)
            docs[current] = m.group(2).strip()
        elif current and line.strip() and line.startswith(" " * 8):
            docs[current] += " " + line.strip()
    return docs


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_flags(parser: argparse.ArgumentParser, sections: Mapping[str, type],
                     defaults: Optional[Mapping[str, Any]] = None) -> None:
    """One ``--flag`` per dataclass field; a name shared by sections is one flag.

    Args:
      defaults: ``{field: value}`` overriding the dataclass defaults (a task's
        preferred optimiser settings).
    """
    seen, defaults = set(), dict(defaults or {})
    for section, cls in sections.items():
        group = parser.add_argument_group(f"{section} ({cls.__name__})")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            default = defaults.get(f.name, f.default)
            typ = parse_bool if isinstance(f.default, bool) else type(f.default)
            group.add_argument(f"--{f.name}", type=typ, default=default,
                               help=f"{docs.get(f.name, '')} (default: {default})")


def build_configs(sections: Mapping[str, type], args: argparse.Namespace) -> Dict[str, Any]:
    """Frozen config dataclass per section, from parsed flags (shared names feed all).

    Raises:
      ValueError: a float flag is NaN or infinite (``float("nan")`` parses and
        slips past every ``<``/``>`` check), or a section's own check fails.
    """
    for cls in sections.values():
        for f in dataclasses.fields(cls):
            value = getattr(args, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{f.name} must be a finite number, got {value}.")
    return {s: cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}) for s, cls in sections.items()}


def configs_to_json(model: str, configs: Mapping[str, Any]) -> Dict[str, Any]:
    return {"model_name": model, **{s: dataclasses.asdict(c) for s, c in configs.items()}}


def configs_from_json(sections: Mapping[str, type], saved: Mapping[str, Any]) -> Dict[str, Any]:
    """Config dataclasses from a saved ``config.json``; a missing section or unknown field is a ValueError."""
    try:
        return {s: cls(**saved[s]) for s, cls in sections.items()}
    except (KeyError, TypeError) as e:
        raise ValueError(f"config.json does not match this version of train.py ({type(e).__name__}: {e}); "
                         "restore the file, or use a fresh --workdir.") from None
