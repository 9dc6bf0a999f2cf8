"""Model families built from :mod:`flax_attention` layers."""

from flax_attention.models.bigru import (
    BiGRU,
    BiGRUClassifier,
    BiGRUConfig,
    bidirectional_gru,
    gru_recurrence,
)

__all__ = ["BiGRU", "BiGRUClassifier", "BiGRUConfig", "bidirectional_gru", "gru_recurrence"]
