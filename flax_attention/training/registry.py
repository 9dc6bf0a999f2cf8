"""The ``--model`` choices of ``train.py``: every task, by name."""

from __future__ import annotations

from typing import Dict

from flax_attention.training.lm import LM
from flax_attention.training.seq2seq import SEQ2SEQ
from flax_attention.training.task import Task
from flax_attention.training.tasks import BIGRU, TRANSFORMER
from flax_attention.training.translate import TRANSLATE

REGISTRY: Dict[str, Task] = {t.name: t for t in (BIGRU, TRANSFORMER, SEQ2SEQ, TRANSLATE, LM)}


def get_task(name: str) -> Task:
    if name not in REGISTRY:
        raise ValueError(f"unknown --model {name!r}; choose one of {sorted(REGISTRY)}.")
    return REGISTRY[name]
