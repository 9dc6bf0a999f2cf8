"""Flax NNX modules over the same pure functions as the linen modules.

``import flax_attention.nnx`` (``import flax_attention`` does not import it,
so linen users do not pay for it). Each module names its parameters as its
linen twin does; :func:`linen_variables` and :func:`load_linen_variables`
move them (and the decoding cache) between the two. Shape legend and mask
convention: see :mod:`flax_attention`.
"""

from flax_attention.nnx.additive import AdditiveAttention, BahdanauAttention
from flax_attention.nnx.convert import linen_variables, load_linen_variables
from flax_attention.nnx.layers import (
    PositionwiseFeedForward,
    TransformerDecoderLayer,
    TransformerEncoderLayer,
)
from flax_attention.nnx.lm import LanguageModel
from flax_attention.nnx.multihead import MultiHeadAttention
from flax_attention.nnx.transformer import (
    SinusoidalPositionalEncoding,
    Transformer,
    TransformerDecoder,
    TransformerEncoder,
    beam_search,
    greedy_decode,
    linen_twin,
)

__all__ = [
    "AdditiveAttention",
    "BahdanauAttention",
    "LanguageModel",
    "MultiHeadAttention",
    "PositionwiseFeedForward",
    "SinusoidalPositionalEncoding",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "beam_search",
    "greedy_decode",
    "linen_twin",
    "linen_variables",
    "load_linen_variables",
]
