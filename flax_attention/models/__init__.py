"""Model families built from :mod:`flax_attention` layers."""

from flax_attention.models.bigru import (
    BiGRU,
    BiGRUClassifier,
    BiGRUConfig,
    bidirectional_gru,
    gru_recurrence,
)
from flax_attention.models.lm import LanguageModel, LMConfig

__all__ = ["BiGRU", "BiGRUClassifier", "BiGRUConfig", "LMConfig", "LanguageModel", "bidirectional_gru",
           "gru_recurrence"]
